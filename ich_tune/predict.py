"""A trained model on new slices: any folder of DICOM files scored, or metrics on labelled data.

Slices are decoded exactly as the preprocessed cache decodes them (`read_hu`, then `to_channels` at
the experiment's size and channels) and go through the training code's own inference loop
(`predict_batches`), so a model sees at prediction time the pixels it was trained and validated on.
A model trained with `data.context` gets each slice with its neighbours, found as training found
them: the folder's series are rebuilt from the DICOM headers and ordered by z.

A folder is written out in one of two forms: Kaggle's submission (six `ID_<hex>_<subtype>` rows
per image), or a wide table of one row per image with its UIDs and place in its series, beside a
summary of one row per study, which is what a reader of a hospital export wants first.
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ich_tune.config.schema import DataConfig, ExperimentConfig
from ich_tune.data.cache import open_cache
from ich_tune.data.folder import Folder, FolderImage, decode, readers, scan
from ich_tune.data.labels import CLASSES, HEADER, read_labels
from ich_tune.data.loader import validation_batches
from ich_tune.data.neighbours import neighbour_table, stack_neighbours, with_neighbours
from ich_tune.data.pool import Runner
from ich_tune.data.prepare import load_splits, prepare_cache
from ich_tune.data.rsna import LABELS_CSV, RSNA_ANY, RSNA_RATES
from ich_tune.errors import DataError, UserError
from ich_tune.evaluation.metrics import compute_metrics
from ich_tune.files import atomic
from ich_tune.progress import bar
from ich_tune.training.device import place
from ich_tune.training.loop import predict_batches

log = logging.getLogger(__name__)

SUBMISSION_CLIP = 1e-6  # competition practice: a confident mistake must not cost an infinite log loss
SPLITS = ("val", "all")
IMAGE_COLUMNS = ("file", "image_id", "patient_id", "study_uid", "series_uid", "instance_uid",
                 "instance_number", "z", "slice")
STUDY_COLUMNS = ("study_uid", "patient_id", "images", "unreadable", "max_any", "max_any_image",
                 "max_any_file")
SHOWN = 10  # studies and unusable files printed; the files written hold them all


@dataclass
class FolderPrediction:
    """A scored folder: the images that decoded, in series order, and their probabilities."""

    folder: Folder
    images: list[FolderImage]
    probs: np.ndarray  # [len(images), 6], CLASSES order
    unreadable: dict[str, str]  # file -> reason: images whose header or pixels could not be used


def predict_dicom(model: torch.nn.Module, config: ExperimentConfig, dicom_dir: Path,
                  batch_size: int | None = None, workers: int | None = None) -> FolderPrediction:
    """Probabilities for every CT slice under `dicom_dir`, at any depth and under any name.

    Headers and pixels are read by `workers` processes (default: one per core); batches go to the
    model as they are decoded. `batch_size` defaults to the training batch size, which is known to
    fit in memory.
    """
    step = _batch_size(batch_size, config)
    with readers(workers) as run:
        folder = scan(Path(dicom_dir), run)
        unreadable = dict(folder.unreadable)
        todo = [image for image in folder.images if image.file not in unreadable]
        progress = bar(len(todo), "predict")
        decoded: list[FolderImage] = []

        def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            stream = _inputs(todo, config.data, run, unreadable, progress)
            while chunk := list(itertools.islice(stream, step)):
                decoded.extend(image for image, _ in chunk)
                images = np.stack([array for _, array in chunk])
                yield torch.from_numpy(images), torch.zeros(len(chunk), 0)  # no labels here

        probs, _ = _predict(model, config, batches())
        progress.close()
    return FolderPrediction(folder, decoded, probs, unreadable)


def _inputs(images: list[FolderImage], cfg: DataConfig, run: Runner, unreadable: dict[str, str],
            progress: tqdm) -> Iterator[tuple[FolderImage, np.ndarray]]:
    """(image, [(2k+1) * C, S, S]) for every image that decodes, series after series.

    Each series is decoded once and its slices stacked with their neighbours by the rules training
    uses (neighbours.py), so a slice that does not decode is nobody's neighbour, here as in the cache.
    """
    k = cfg.context
    for key, members in itertools.groupby(decode(images, cfg.channels, cfg.size, run),
                                          key=lambda pair: pair[0].series_key):
        good = []
        for image, result in members:
            progress.update(1)
            if isinstance(result, str):
                unreadable[image.file] = result
            else:
                good.append((image, result))
        if good and k:
            table = neighbour_table(np.full(len(good), key), np.array([i.z for i, _ in good]),
                                    np.ones(len(good), bool), k)
            stacked = stack_neighbours(np.stack([a for _, a in good]), table)
            good = zip([i for i, _ in good], stacked, strict=True)
        yield from good


def kaggle_rows(prediction: FolderPrediction) -> tuple[list[str], np.ndarray, dict[str, str]]:
    """Every image's id (sorted) and probabilities; an unreadable image is predicted at the training
    label rates, so that a submission still covers every image. Files that are not DICOM are no
    images and have no rows."""
    folder = prediction.folder
    named = {image.file: image.image_id for image in folder.images}
    ids = [image.image_id for image in folder.images]
    first, count = Counter(ids).most_common(1)[0]
    if count > 1:
        files = [image.file for image in folder.images if image.image_id == first]
        raise UserError(f"{folder.root}: {len(files)} files hold image {first} ({', '.join(files[:3])}); "
                        "a Kaggle submission needs one file per image id. Use --format wide.")
    rows = {name: k for k, name in enumerate(sorted(ids))}
    probs = np.empty((len(ids), len(CLASSES)), np.float64)
    probs[[rows[image.image_id] for image in prediction.images]] = prediction.probs
    unreadable = {named[file]: reason for file, reason in prediction.unreadable.items()}
    if unreadable:
        probs[[rows[name] for name in unreadable]] = label_rates(folder.root)
    return list(rows), probs, unreadable


def label_rates(dicom_dir: Path) -> np.ndarray:
    """Per-class positive rates: of the dataset's labels CSV beside the folder, else RSNA's."""
    labels = dicom_dir.parent / LABELS_CSV
    if labels.is_file():
        try:
            rates = read_labels(labels).y.mean(axis=0)
            log.info(f"predict: unreadable slices get the label rates of {labels}")
            return rates
        except DataError as err:
            log.info(f"predict: {err}")
    log.info("predict: unreadable slices get RSNA's published label rates")
    return np.array([{**RSNA_RATES, "any": RSNA_ANY}[name] for name in CLASSES])


def write_submission(path: Path, ids: list[str], probs: np.ndarray) -> None:
    """The Kaggle file: `ID,Label`, then six `ID_<hex>_<subtype>,<p>` rows per image, images sorted
    by id and subtypes in CLASSES order as in stage_2_sample_submission.csv; written atomically."""
    probs = np.clip(np.asarray(probs, np.float64), SUBMISSION_CLIP, 1.0 - SUBMISSION_CLIP)
    if probs.shape != (len(ids), len(CLASSES)) or len(set(ids)) != len(ids):
        raise ValueError(f"need {len(ids)} distinct ids and probabilities of shape [{len(ids)}, "
                         f"{len(CLASSES)}], got {len(set(ids))} and {probs.shape}")
    lines = [HEADER]
    for k in sorted(range(len(ids)), key=ids.__getitem__):
        lines.extend(f"{ids[k]}_{name},{p:.6g}" for name, p in zip(CLASSES, probs[k], strict=True))
    _write(path, "\n".join(lines) + "\n", "the submission")


def write_wide(path: Path, prediction: FolderPrediction) -> None:
    """One row per scored image: file, ids, UIDs, z, its 1-based slice number in its series (by z,
    then instance number), and the six probabilities unclipped."""
    slices = Counter()
    rows = []
    for image, probs in zip(prediction.images, prediction.probs, strict=True):
        slices[image.series_key] += 1
        rows.append([image.file, image.image_id, image.patient_id, image.study_uid, image.series_uid,
                     image.instance_uid, _blank(image.instance_number), _blank(image.z),
                     slices[image.series_key], *(f"{p:.6g}" for p in probs)])
    _write(path, _csv([*IMAGE_COLUMNS, *CLASSES], rows), "the predictions")


def study_rows(prediction: FolderPrediction) -> list[dict]:
    """One row per study, the most likely bleed first: images scored and unreadable, the highest
    probability of `any` and the image that has it. Studies with no image scored come last."""
    found = {image.file: image for image in prediction.folder.images}
    unreadable = Counter(found[file].study_uid for file in prediction.unreadable)
    members = defaultdict(list)
    for k, image in enumerate(prediction.images):
        members[image.study_uid].append(k)
    rows = []
    for study in sorted(set(members) | set(unreadable)):
        row = {"study_uid": study, "patient_id": "", "images": len(members[study]),
               "unreadable": unreadable[study], "max_any": None, "max_any_image": "", "max_any_file": ""}
        if members[study]:
            best = max(members[study], key=lambda k: prediction.probs[k, -1])
            image = prediction.images[best]
            row.update(patient_id=image.patient_id, max_any=float(prediction.probs[best, -1]),
                       max_any_image=image.image_id, max_any_file=image.file)
        rows.append(row)
    return sorted(rows, key=lambda row: (row["max_any"] is None, -(row["max_any"] or 0.0)))


def save_predictions(prediction: FolderPrediction, out: Path, form: str | None = None) -> str:
    """Write `out` as Kaggle's submission or the wide table, the form defaulting to Kaggle's for a
    folder of ID_<hex>.dcm files; the wide table gets `<out stem>.studies.csv` and
    `<out stem>.skipped.csv` beside it. Lists what could not be used; returns the form written."""
    out = Path(out)
    folder = prediction.folder
    form = form or ("kaggle" if folder.rsna_named else "wide")
    if form == "kaggle":
        ids, probs, _ = kaggle_rows(prediction)
        write_submission(out, ids, probs)
        log.info(f"{len(ids)} images -> {out} ({probs.size} rows)")
    else:
        studies = study_rows(prediction)
        write_wide(out, prediction)
        _write(sibling(out, "studies"), _csv(STUDY_COLUMNS, [[_blank(row[c]) for c in STUDY_COLUMNS]
                                                             for row in studies]), "the study summary")
        unused = {**prediction.unreadable, **folder.skipped}
        _write(sibling(out, "skipped"), _csv(("file", "reason"), sorted(unused.items())), "the skipped files")
        scored = sum(row["images"] > 0 for row in studies)
        log.info(f"{len(prediction.images)} images of {scored} studies -> {out}; per study: "
                 f"{sibling(out, 'studies')}")
        _show_studies(studies)
    _show_files(prediction.unreadable, "unreadable" + (", predicted at the training label rates"
                                                       if form == "kaggle" else ""))
    _show_files(folder.skipped, "skipped, not DICOM")
    return form


def sibling(out: Path, part: str) -> Path:
    """`runs/scores.csv` -> `runs/scores.<part>.csv`: a file written beside the predictions."""
    return out.with_name(f"{out.stem}.{part}{out.suffix or '.csv'}")


def _show_studies(studies: list[dict]) -> None:
    log.info(f"  {'max any':>8}  {'images':>6}  study (image with the max)")
    for row in studies[:SHOWN]:
        score = "-" if row["max_any"] is None else f"{row['max_any']:.3f}"
        log.info(f"  {score:>8}  {row['images']:>6}  {row['study_uid'] or '(no StudyInstanceUID)'} "
                 f"({row['max_any_file'] or 'none decoded'})")
    if len(studies) > SHOWN:
        log.info(f"  ... and {len(studies) - SHOWN} more studies")


def _show_files(reasons: dict[str, str], what: str) -> None:
    if not reasons:
        return
    log.info(f"{len(reasons)} {what}:")
    for file, reason in list(reasons.items())[:SHOWN]:
        log.info(f"  {file}: {reason}")
    if len(reasons) > SHOWN:
        log.info(f"  ... and {len(reasons) - SHOWN} more")


def _blank(value: object) -> object:
    """CSV cell: empty for a missing value (None, NaN)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return f"{value:.6g}" if isinstance(value, float) else value


def _csv(header: Iterable[str], rows: Iterable[Iterable]) -> str:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return text.getvalue()


def _write(path: Path, text: str, what: str) -> None:
    """Written atomically: a reader never sees half a file, and a failed write leaves none."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic(path) as partial:
            partial.write_text(text)
    except OSError as err:
        raise UserError(f"{path}: cannot write {what} ({err.strerror or err}).") from None


def evaluate_split(model: torch.nn.Module, config: ExperimentConfig, split: str = "val",
                   batch_size: int | None = None) -> dict[str, float]:
    """`compute_metrics` on the experiment's labelled data: its validation split (the patients
    training held out, split as training split them) or, with split "all", every decoded slice."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    cache_path = prepare_cache(config.data)
    if split == "val":
        splits = load_splits(cache_path, config.data)
        cache, indices = splits.cache, splits.val
    else:
        cache = with_neighbours(open_cache(cache_path), config.data.context)
        indices = np.flatnonzero(cache.valid)
    progress = bar(len(indices), f"evaluate ({split})")
    batches = validation_batches(cache, indices, _batch_size(batch_size, config))
    probs, labels = _predict(model, config, _counted(batches, progress))
    progress.close()
    return compute_metrics(probs, labels)


def _batch_size(asked: int | None, config: ExperimentConfig) -> int:
    if asked is not None and asked < 1:
        raise UserError(f"--batch-size {asked}: must be at least 1.")
    return asked or config.train.batch_size


def _predict(model: torch.nn.Module, config: ExperimentConfig,
             batches: Iterable) -> tuple[np.ndarray, np.ndarray]:
    """`predict_batches` on the best device with the training precision; copes with no batches."""
    placement = place(config.train)
    placement.model(model)
    batches = iter(batches)
    first = next(batches, None)
    if first is None:  # every file unreadable
        return np.empty((0, len(CLASSES))), np.empty((0, len(CLASSES)))
    return predict_batches(model, itertools.chain([first], batches), placement)


def _counted(batches: Iterable, progress: tqdm) -> Iterator:
    for images, labels in batches:
        yield images, labels
        progress.update(len(images))
