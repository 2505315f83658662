"""A trained model on new slices: a Kaggle submission for a DICOM folder, or metrics on labelled data.

Slices are decoded exactly as the preprocessed cache decodes them (`read_hu`, then `to_channels` at
the experiment's size and channels) and go through the training code's own inference loop
(`predict_batches`), so a model sees at prediction time the pixels it was trained and validated on.
A model trained with `data.context` gets each slice with its neighbours, found as training found
them: the folder's series are rebuilt from the DICOM headers and ordered by z.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from ich_tune.config.schema import DataConfig, ExperimentConfig
from ich_tune.data.cache import LABELS_CSV, open_cache
from ich_tune.data.channels import Channel, parse_channels, to_channels
from ich_tune.data.context import neighbour_table, stack, with_context
from ich_tune.data.dicom import DicomError, image_id, read_header, read_hu
from ich_tune.data.labels import CLASSES, HEADER, read_labels
from ich_tune.data.loader import validation_batches
from ich_tune.data.prepare import load_splits, prepare_cache
from ich_tune.data.synthetic import RSNA_ANY, RSNA_RATES
from ich_tune.device import place
from ich_tune.errors import DataError, UserError
from ich_tune.metrics import compute_metrics
from ich_tune.progress import Progress
from ich_tune.train import predict_batches

SUBMISSION_CLIP = 1e-6  # competition practice: a confident mistake must not cost an infinite log loss
SPLITS = ("val", "all")


def find_slices(dicom_dir: Path) -> dict[str, Path]:
    """image id -> file for every ID_*.dcm and ID_*.dcm.gz in the folder, sorted by id."""
    if not dicom_dir.is_dir():
        raise DataError(f"{dicom_dir}: no such folder; --dicom-dir must be a folder of ID_<hex>.dcm files "
                        "(Kaggle's stage_2_test/).")
    files = {image_id(p): p for p in dicom_dir.iterdir()
             if p.name.startswith("ID_") and p.name.endswith((".dcm", ".dcm.gz"))}
    if not files:
        raise DataError(f"{dicom_dir}: no ID_*.dcm or ID_*.dcm.gz files there; point --dicom-dir at "
                        "Kaggle's stage_2_test/ (or another folder of RSNA-named slices).")
    return dict(sorted(files.items()))


def predict_folder(model: torch.nn.Module, config: ExperimentConfig, dicom_dir: Path,
                   batch_size: int | None = None, log=print
                   ) -> tuple[list[str], np.ndarray, dict[str, str]]:
    """Probabilities [N, 6] (CLASSES order) for every slice in the folder, ids sorted.

    An unreadable file is returned in `unreadable` (id -> reason) and predicted at the training
    label rates, so that a submission still covers every image. `batch_size` defaults to the
    training batch size, which is known to fit in memory.
    """
    dicom_dir = Path(dicom_dir)
    files = find_slices(dicom_dir)
    step = _batch_size(batch_size, config)
    decoded: list[str] = []
    unreadable: dict[str, str] = {}
    inputs = _with_neighbours if config.data.context else _alone
    progress = Progress(len(files), "predict")

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        stream = inputs(files, config.data, unreadable, progress)
        while chunk := list(itertools.islice(stream, step)):
            decoded.extend(name for name, _ in chunk)
            images = np.stack([image for _, image in chunk])
            yield torch.from_numpy(images), torch.zeros(len(chunk), 0)  # no labels here

    probs, _ = _predict(model, config, batches())
    progress.close()
    rows = {name: k for k, name in enumerate(files)}
    out = np.empty((len(files), len(CLASSES)), np.float64)
    out[[rows[name] for name in decoded]] = probs
    if unreadable:
        out[[rows[name] for name in unreadable]] = label_rates(dicom_dir, log)
    return list(files), out, unreadable


def _alone(files: dict[str, Path], cfg: DataConfig, unreadable: dict[str, str],
           progress: Progress) -> Iterator[tuple[str, np.ndarray]]:
    """(id, [C, S, S]) for every decodable slice, in id order; the others go into `unreadable`."""
    channels = parse_channels(cfg.channels)
    for name, path in files.items():
        image = _decode(name, path, channels, cfg.size, unreadable)
        progress.update(1)
        if image is not None:
            yield name, image


def _with_neighbours(files: dict[str, Path], cfg: DataConfig, unreadable: dict[str, str],
                     progress: Progress) -> Iterator[tuple[str, np.ndarray]]:
    """(id, [(2k+1) * C, S, S]) for every decodable slice, series by series.

    The headers come first, to group the slices into series; then each series is decoded once and
    its slices stacked with their neighbours by the rules training uses (context.py), so a slice
    that does not decode is nobody's neighbour, here as in the cache.
    """
    channels = parse_channels(cfg.channels)
    series: dict[str, list[tuple[str, Path, float]]] = {}
    headers = Progress(len(files), "predict: reading series headers")
    for name, path in files.items():
        try:
            header = read_header(path)
            series.setdefault(header.series_uid, []).append((name, path, header.z))
        except DicomError as err:
            unreadable[name] = err.reason
            progress.update(1)
        headers.update(1)
    headers.close()
    for uid, members in series.items():
        names, z, images = [], [], []
        for name, path, position in members:
            image = _decode(name, path, channels, cfg.size, unreadable)
            if image is not None:
                names.append(name)
                z.append(position)
                images.append(image)
        progress.update(len(members))
        if images:
            table = neighbour_table(np.full(len(names), uid), np.array(z), np.ones(len(names), bool),
                                    cfg.context)
            yield from zip(names, stack(np.stack(images), table), strict=True)


def _decode(name: str, path: Path, channels: tuple[Channel, ...], size: int,
            unreadable: dict[str, str]) -> np.ndarray | None:
    """The slice's channels, or None with the reason in `unreadable`."""
    try:
        return to_channels(read_hu(path), channels, size)
    except DicomError as err:
        unreadable[name] = err.reason
        return None


def label_rates(dicom_dir: Path, log=print) -> np.ndarray:
    """Per-class positive rates: of the dataset's labels CSV beside the folder, else RSNA's."""
    csv = dicom_dir.parent / LABELS_CSV
    if csv.is_file():
        try:
            rates = read_labels(csv).y.mean(axis=0)
            log(f"predict: unreadable slices get the label rates of {csv}")
            return rates
        except DataError as err:
            log(f"predict: {err}")
    log("predict: unreadable slices get RSNA's published label rates")
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
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text("\n".join(lines) + "\n")
        os.replace(partial, path)
    except OSError as err:
        if partial.is_file():
            partial.unlink()
        raise UserError(f"{path}: cannot write the submission ({err.strerror or err}).") from None


def evaluate_split(model: torch.nn.Module, config: ExperimentConfig, split: str = "val",
                   batch_size: int | None = None, log=print) -> dict[str, float]:
    """`compute_metrics` on the experiment's labelled data: its validation split (the patients
    training held out, split as training split them) or, with split "all", every decoded slice."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    cache_path = prepare_cache(config.data, log)
    if split == "val":
        splits = load_splits(cache_path, config.data, log)
        cache, indices = splits.cache, splits.val
    else:
        cache = with_context(open_cache(cache_path), config.data.context)
        indices = np.flatnonzero(cache.valid)
    progress = Progress(len(indices), f"evaluate ({split})")
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


def _counted(batches: Iterable, progress: Progress) -> Iterator:
    for images, labels in batches:
        yield images, labels
        progress.update(len(images))
