"""Synthetic RSNA-layout data: real DICOM files and Kaggle CSVs drawn from a head phantom.

The real dataset is 450 GB, so demos and tests run on this instead, read by the same code as the
real thing. The files copy RSNA's layout, tags and quirks (12-bit wrap-around, other intercepts,
signed pixels, odd sizes, multi-valued windows, one corrupt file, duplicated CSV rows), and label
rates follow RSNA's. Everything derives from `seed`: same arguments, byte-identical files.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from ich_tune.data.labels import CLASSES, write_labels
from ich_tune.data.phantom import (
    DIFFICULTIES,
    SUBTYPES,
    Bleed,
    Difficulty,
    Head,
    moved,
    random_bleed,
    random_head,
    render_slice,
    ventricle_slices,
)
from ich_tune.data.rsna import LABELS_CSV, RSNA_ANY, RSNA_RATES, SUBMISSION_CSV, TEST_DIR, TRAIN_DIR
from ich_tune.errors import DataError
from ich_tune.files import atomic

SLICE_MM = 5.0
ENCODINGS = {  # name: (BitsStored, PixelRepresentation, RescaleIntercept)
    "plain": (16, 0, -1024),
    "bits12": (12, 0, -1024),
    "wrapped12": (12, 0, 1),  # RSNA's broken 12-bit files: only the known fix gives true HU
    "signed": (16, 1, -1024),
    "intercept0": (16, 1, 0),
    "intercept1000": (16, 0, -1000),
}
BONE_WINDOW = ("600", "2800")  # the second value of a multi-valued window
_WINDOWS = [(40, 80), (40, 150), (35, 80), (30, 80), (40, 100), (36, 80)]  # center, width
_IMPLEMENTATION_UID = generate_uid(entropy_srcs=["ich_tune synthetic RSNA"])


@dataclass(frozen=True)
class Study:
    """One CT exam: a series of `slices` axial slices, SLICE_MM apart."""

    patient: str
    uid: str
    series: str
    head: Head
    bleeds: tuple[Bleed, ...]
    slices: int
    fov_mm: float  # field of view: PixelSpacing is fov_mm / matrix size
    window: tuple[int, int]  # the scanner's display window, center and width


@dataclass(frozen=True)
class Image:
    """One DICOM file to write: which slice of which study, and how to encode it."""

    id: str
    split: str  # "train" or "test"
    study: Study
    z: int
    size: int
    encoding: str  # a key of ENCODINGS
    multi_window: bool
    truncated: bool  # pixel data cut short, like RSNA's corrupt ID_6431af929

    def render(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The slice in HU and its bleed masks (see phantom.render_slice)."""
        return render_slice(self.study.head, self.study.bleeds, self.z, self.study.slices,
                            self.size)


MARKER = ".ich_tune_synthetic"  # written first: this folder holds (or is getting) generated data


def generate(
    out: Path,
    studies: int = 40,
    slices: int = 24,
    size: int = 256,
    seed: int = 0,
    positive_rate: float = 0.144,
    quirk_rate: float = 0.05,
    test_studies: int | None = None,
    difficulty: str = "demo",
) -> dict:
    """Write a synthetic dataset under `out` and return a summary of what was written.

    `stage_2_train.csv` is written last, through a temporary name: its presence is what marks a
    dataset complete, so an interrupted run is never mistaken for a finished one.
    """
    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise DataError(f"{out}: this folder holds files the synthetic generator did not write; "
                        "it will not mix synthetic slices into them. Choose a new or empty folder.")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("synthetic RSNA-layout data written by ich_tune\n")
    (out / LABELS_CSV).unlink(missing_ok=True)
    images = plan(studies, slices, size, seed, positive_rate, quirk_rate, test_studies, difficulty)
    for folder in (TRAIN_DIR, TEST_DIR):
        (out / folder).mkdir(parents=True, exist_ok=True)
    labels = {}
    for image in images:
        hu, masks = image.render()
        found = [masks[kind].any() for kind in SUBTYPES]
        labels[image.id] = [*found, any(found)]
        write_dicom(image, hu, out / (TRAIN_DIR if image.split == "train" else TEST_DIR)
                    / f"{image.id}.dcm")

    # sorted by id, which is random: like RSNA's files, rows are not grouped by study
    train = sorted(i.id for i in images if i.split == "train")
    test = sorted(i.id for i in images if i.split == "test")
    rows = [f"{i}_{name},0.5" for i in test for name in CLASSES]
    with atomic(out / SUBMISSION_CSV) as part:
        part.write_bytes("\n".join(["ID,Label", *rows, ""]).encode())
    repeated = _duplicated(train, seed, quirk_rate)
    ids = train + repeated
    with atomic(out / LABELS_CSV) as part:
        write_labels(part, ids, np.array([labels[i] for i in ids], np.uint8))
    return _summary(images, labels, size, len(repeated))


def plan(
    studies: int = 40,
    slices: int = 24,
    size: int = 256,
    seed: int = 0,
    positive_rate: float = 0.144,
    quirk_rate: float = 0.05,
    test_studies: int | None = None,
    difficulty: str = "demo",
) -> list[Image]:
    """Every image `generate` writes with these arguments, train studies first.

    It renders and writes nothing, so tests can re-render any file's slice and masks. `difficulty`
    names a phantom.DIFFICULTIES preset: how faint, small and noisy the bleeds are.

    Separate random streams for anatomy, bleeds, ids and quirks keep each independent of the
    others: the same seed with quirk_rate 0 gives the same heads and labels.
    """
    if difficulty not in DIFFICULTIES:
        raise DataError(f"unknown synthetic difficulty {difficulty!r}; expected one of "
                        f"{', '.join(DIFFICULTIES)}")
    hard = DIFFICULTIES[difficulty]
    if test_studies is None:
        test_studies = max(1, studies // 10)
    rng = _stream(seed, 0)
    heads, patients = _heads(rng, studies, test_studies, hard)
    bleeds = (_plan_bleeds(_stream(seed, 1), studies, slices, positive_rate, hard)
              + _plan_bleeds(_stream(seed, 2), test_studies, slices, positive_rate, hard))
    ids = _stream(seed, 3)
    image_ids = _hex_ids(ids, len(heads) * slices, 9)
    patient_ids = _hex_ids(ids, max(patients) + 1, 8)
    study_ids = _hex_ids(ids, 2 * len(heads), 10)
    studies_out = [
        Study(patient=patient_ids[patients[k]], uid=study_ids[2 * k],
              series=study_ids[2 * k + 1], head=head, bleeds=tuple(bleeds[k]), slices=slices,
              fov_mm=rng.uniform(135, 150) / head.a, window=_WINDOWS[rng.integers(len(_WINDOWS))])
        for k, head in enumerate(heads)
    ]
    n = len(image_ids)
    quirks = _stream(seed, 4)
    names = list(ENCODINGS)[1:]  # each quirky encoding takes a `share` of the files
    share = min(quirk_rate, 1 / len(ENCODINGS))
    pick = (quirks.random(n) // share).astype(np.int64) if share > 0 else np.full(n, len(names))
    resized = quirks.random(n) < quirk_rate
    scale = quirks.choice([3, 5], n)
    multi = quirks.random(n) < quirk_rate
    cut = int(quirks.integers(studies * slices)) if quirk_rate > 0 else -1
    return [
        Image(id=image_ids[k], split="train" if k < studies * slices else "test",
              study=studies_out[k // slices], z=k % slices,
              size=size * int(scale[k]) // 4 if resized[k] else size,
              encoding=names[pick[k]] if pick[k] < len(names) else "plain",
              multi_window=bool(multi[k]), truncated=k == cut)
        for k in range(n)
    ]


def encode(hu: np.ndarray, encoding: str) -> np.ndarray:
    """Stored pixel values that give back `hu` (whole numbers) under `encoding`'s tags.

    For "wrapped12" the known fix (stored + 1000, minus 4096 at or past 4096, intercept -1000)
    must recover HU, so stored = HU mod 4096 for HU in [-1000, 3095].
    """
    _, signed, intercept = ENCODINGS[encoding]
    whole = hu.astype(np.int32)
    stored = whole % 4096 if encoding == "wrapped12" else whole - intercept
    return stored.astype(np.int16 if signed else np.uint16)


def write_dicom(image: Image, hu: np.ndarray, path: Path) -> None:
    """One CT slice as RSNA ships it: explicit VR little endian, uncompressed, ID_ style UIDs."""
    study = image.study
    bits, signed, intercept = ENCODINGS[image.encoding]
    spacing = study.fov_mm / image.size
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.add(_uid(0x00020003, image.id))
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _IMPLEMENTATION_UID
    meta.ImplementationVersionName = "ICH_TUNE_SYN"
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.add(_uid(0x00080018, image.id))  # SOPInstanceUID: RSNA puts the image id here
    ds.Modality = "CT"
    ds.PatientID = study.patient
    ds.add(_uid(0x0020000D, study.uid))
    ds.add(_uid(0x0020000E, study.series))
    ds.InstanceNumber = image.z + 1
    ds.ImagePositionPatient = [_ds(-study.fov_mm / 2), _ds(-study.fov_mm / 2),
                               _ds(image.z * SLICE_MM - 60)]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PixelSpacing = [_ds(spacing), _ds(spacing)]
    ds.SliceThickness = _ds(SLICE_MM)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = hu.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = signed
    center, width = (str(v) for v in study.window)
    if image.multi_window:
        ds.WindowCenter, ds.WindowWidth = [center, BONE_WINDOW[0]], [width, BONE_WINDOW[1]]
    else:
        ds.WindowCenter, ds.WindowWidth = center, width
    ds.RescaleIntercept = str(intercept)
    ds.RescaleSlope = "1"
    data = encode(hu, image.encoding).tobytes()
    ds.PixelData = data[: len(data) // 4 * 2] if image.truncated else data
    with warnings.catch_warnings():  # pydicom re-checks the UIDs as it copies the file meta
        warnings.filterwarnings("ignore", "Invalid value for VR UI", UserWarning)
        ds.save_as(path, enforce_file_format=True)


def _uid(tag: int, value: str) -> DataElement:
    # RSNA's "ID_<hex>" values are not valid UIDs; write them as RSNA did, without a warning
    return DataElement(tag, "UI", value, validation_mode=config.IGNORE)


def _ds(value: float) -> str:
    return f"{value:.6g}"


def _stream(seed: int, part: int) -> np.random.Generator:
    return np.random.default_rng([seed & (2**64 - 1), part])


def _hex_ids(rng: np.random.Generator, count: int, digits: int) -> list[str]:
    """`count` distinct ids like RSNA's `ID_63eb1e259`, in draw order."""
    seen: dict[int, None] = {}
    while len(seen) < count:
        for value in rng.integers(0, 16**digits, count - len(seen)).tolist():
            seen.setdefault(value)
    return [f"ID_{value:0{digits}x}" for value in seen]


def _heads(rng: np.random.Generator, train: int, test: int,
           difficulty: Difficulty) -> tuple[list[Head], list[int]]:
    """One head per study and its patient number; some patients have two studies of one split.

    Train and test never share a patient, so a patient-wise split of the train set stays honest.
    """
    heads: list[Head] = []
    patients: list[int] = []
    for count in (train, test):
        own = [random_head(rng, difficulty) for _ in range(count)]
        owner = list(range(len(patients), len(patients) + count))
        pairs = max(1, round(0.15 * count)) if count >= 2 else 0
        order = rng.permutation(count)
        for first, second in zip(order[: 2 * pairs : 2], order[1 : 2 * pairs : 2], strict=True):
            own[second] = moved(own[first], rng)
            owner[second] = owner[first]
        heads += own
        patients += owner
    return heads, patients


def _plan_bleeds(
    rng: np.random.Generator, n_studies: int, slices: int, positive_rate: float, difficulty: Difficulty
) -> list[list[Bleed]]:
    """Bleed runs per study: about `positive_rate` of slices with blood, RSNA's mix of subtypes.

    Positive zones (contiguous slices of one study) cover the target share of slices. Each zone
    gets a primary bleed over all of it; further runs of other subtypes go inside zones, which is
    how subtypes co-occur (their rates sum to more than `any`). Intraventricular blood needs
    ventricles, so it is only ever a secondary run within the ventricle slices.
    """
    total = n_studies * slices
    # RSNA's subtype mix, at any positive_rate
    quota = {kind: positive_rate * rate / RSNA_ANY * total for kind, rate in RSNA_RATES.items()}
    zones = _zones(rng, n_studies, slices, round(positive_rate * total))
    runs: list[tuple[int, str, int, int]] = []  # study, kind, first, stop
    primary = [kind for kind in SUBTYPES if kind != "intraventricular"]
    for study, first, stop in zones:
        left = np.array([max(quota[k], 0.0) for k in primary])
        fits = left * (left >= (stop - first) / 2)  # a rare subtype must not swallow a long zone
        weights = fits if fits.any() else left + 1e-9
        kind = primary[rng.choice(len(primary), p=weights / weights.sum())]
        runs.append((study, kind, first, stop))
        quota[kind] -= stop - first
    vent = ventricle_slices(slices)
    for kind in SUBTYPES:
        for _ in range(4 * len(zones)):  # bounded: a quota may not fit the zones there are
            if quota[kind] < 0.5:
                break
            study, first, stop = zones[rng.integers(len(zones))]
            if kind == "intraventricular":
                first, stop = max(first, vent.start), min(stop, vent.stop)
            taken = any(s == study and k == kind and f < stop and first < e for s, k, f, e in runs)
            if stop <= first or taken:
                continue
            length = min(int(rng.integers(1, stop - first + 1)), max(1, round(quota[kind])))
            start = int(rng.integers(first, stop - length + 1))
            runs.append((study, kind, start, start + length))
            quota[kind] -= length
    bleeds: list[list[Bleed]] = [[] for _ in range(n_studies)]
    for study, kind, first, stop in runs:
        bleeds[study].append(random_bleed(kind, first, stop, rng, difficulty))
    return bleeds


def _zones(
    rng: np.random.Generator, n_studies: int, slices: int, target: int
) -> list[tuple[int, int, int]]:
    """Contiguous positive runs (study, first, stop) covering `target` slices, one per study
    while studies last, then in the free slices left."""
    free = np.ones((n_studies, slices), bool)
    fresh = [int(s) for s in rng.permutation(n_studies)]
    zones = []
    placed = 0
    while placed < target:
        want = min(target - placed, int(rng.integers(max(1, slices // 5), slices * 3 // 5 + 2)))
        if fresh:
            study, lo, hi = fresh.pop(), 0, slices
        else:
            gaps = [g for s in range(n_studies) for g in _free_runs(free[s], s)]
            if not gaps:
                break
            fits = [g for g in gaps if g[2] - g[1] >= want]
            if not fits:
                want = max(g[2] - g[1] for g in gaps)
                fits = [g for g in gaps if g[2] - g[1] == want]
            study, lo, hi = fits[rng.integers(len(fits))]
        want = min(want, hi - lo)
        first = int(rng.integers(lo, hi - want + 1))
        free[study, first : first + want] = False
        zones.append((study, first, first + want))
        placed += want
    return zones


def _free_runs(free: np.ndarray, study: int) -> list[tuple[int, int, int]]:
    edges = np.flatnonzero(np.diff(np.concatenate(([0], free.astype(np.int8), [0]))))
    return [(study, int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def _duplicated(train: list[str], seed: int, quirk_rate: float) -> list[str]:
    """Images whose six CSV rows appear twice, as in RSNA's stage-1 file: a few, at least one."""
    if quirk_rate <= 0 or not train:
        return []
    rng = _stream(seed, 5)
    chosen = [i for i, p in zip(train, rng.random(len(train)), strict=True) if p < quirk_rate / 10]
    return chosen or [train[int(rng.integers(len(train)))]]


def _summary(images: list[Image], labels: dict[str, list[bool]], size: int,
             duplicated: int) -> dict:
    train = [i for i in images if i.split == "train"]
    y = np.array([labels[i.id] for i in train], float).reshape(-1, len(CLASSES))
    quirks = Counter(i.encoding for i in images if i.encoding != "plain")
    quirks["size"] = sum(i.size != size for i in images)
    quirks["multi_window"] = sum(i.multi_window for i in images)
    quirks["truncated"] = sum(i.truncated for i in images)
    quirks["duplicated_images"] = duplicated
    return {
        "train_images": len(train),
        "test_images": len(images) - len(train),
        "train_studies": len({i.study.uid for i in train}),
        "test_studies": len({i.study.uid for i in images if i.split == "test"}),
        "patients": len({i.study.patient for i in images}),
        "label_rates": dict(zip(CLASSES, y.mean(0).round(4).tolist(), strict=True)),
        "quirks": dict(quirks),
        "truncated": [i.id for i in images if i.truncated],
    }

