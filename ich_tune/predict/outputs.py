"""A scored folder written out, in one of two forms: Kaggle's submission (six `ID_<hex>_<subtype>`
rows per image), or a wide table of one row per image with its UIDs and place in its series, beside
a summary of one row per study, which is what a reader of a hospital export wants first, and the
files that could not be used.
"""

from __future__ import annotations

import csv
import io
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ich_tune.data.labels import CLASSES, HEADER, read_labels
from ich_tune.data.rsna import LABELS_CSV, RSNA_ANY, RSNA_RATES
from ich_tune.errors import DataError, UserError
from ich_tune.files import atomic
from ich_tune.predict.scoring import FolderPrediction

log = logging.getLogger(__name__)

SUBMISSION_CLIP = 1e-6  # competition practice: a confident mistake must not cost an infinite log loss
IMAGE_COLUMNS = ("file", "image_id", "patient_id", "study_uid", "series_uid", "instance_uid",
                 "instance_number", "z", "slice")
STUDY_COLUMNS = ("study_uid", "patient_id", "images", "unreadable", "max_any", "max_any_image",
                 "max_any_file")
SHOWN = 10  # studies and unusable files printed; the files written hold them all


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
