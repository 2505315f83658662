"""Any folder tree of DICOM files, as a scanner or PACS exports it, read by a pool of processes.

A file is DICOM by what it holds (dicom.py's rules: the 'DICM' marker, or a bare data set with a
SOP Class UID), never by its name: exports name files `IM000001`, `0001.dcm` or nothing at all,
and nest them study/series. Headers are read first, to name every image and rebuild its series;
pixels are decoded afterwards, series after series, so a model given neighbouring slices gets a
whole series at once. Both passes run in worker processes (pool.py), as the cache build does:
decoding costs milliseconds of CPU per slice, and with one process it would leave the other cores
idle. Decoded slices come back through shared memory.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ich_tune.data import pool
from ich_tune.data.channels import Channel, channel_dtype, interpolates, parse_channels, to_channels
from ich_tune.data.dicom import (
    DicomError,
    InstanceHeader,
    NotDicomError,
    image_id,
    read_hu,
    read_instance_header,
)
from ich_tune.data.pool import Runner, Slot, Workers, shared
from ich_tune.errors import DataError
from ich_tune.progress import bar

RSNA_NAME = re.compile(r"ID_[0-9A-Za-z]+\.dcm(\.gz)?")  # Kaggle's ids are hex; any ID_<word>.dcm as before
HEADER_CHUNK, DECODE_CHUNK = 64, 8  # files per task: enough to amortise the pickling, few enough to balance


@dataclass(frozen=True)
class FolderImage:
    """One image file of the folder: where it is, what it is called, and its place in its series."""

    path: str
    file: str  # relative to the folder, for reports
    image_id: str  # the RSNA id of an ID_<hex>.dcm name, else the SOPInstanceUID, else `file`
    patient_id: str = ""
    study_uid: str = ""
    series_uid: str = ""
    instance_uid: str = ""
    instance_number: int | None = None
    z: float = math.nan

    @property
    def series_key(self) -> str:
        """What groups it with its neighbours: its series, or the file alone without a series UID."""
        return self.series_uid or f"file:{self.file}"


@dataclass
class Folder:
    """What a folder holds: images (series by series, by z within each), and what could not be used."""

    root: Path
    images: list[FolderImage]  # every DICOM file, and every RSNA-named one, in decoding order
    unreadable: dict[str, str]  # file -> reason: an image whose header could not be read
    skipped: dict[str, str]  # file -> reason: not DICOM at all

    @property
    def rsna_named(self) -> bool:
        """Every image is named ID_<hex>.dcm, as in Kaggle's stage_2_test/."""
        return bool(self.images) and all(RSNA_NAME.fullmatch(Path(i.file).name) for i in self.images)


def list_files(root: Path) -> list[Path]:
    """Every file under `root`, at any depth, in a stable order."""
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; --dicom-dir must be a folder of DICOM files "
                        "(any names, nested study/series folders too).")
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders.sort()
        found.extend(Path(folder) / name for name in sorted(names))
    return found


def scan(root: Path, run: Runner) -> Folder:
    """Every file under `root` classified by its header: an image, unreadable, or not DICOM."""
    root = Path(root)
    paths = list_files(root)
    if not paths:
        raise DataError(f"{root}: an empty folder; point --dicom-dir at a folder of CT slices, e.g. a "
                        "study export or Kaggle's stage_2_test/.")
    images, unreadable, skipped = [], {}, {}
    chunks = [[str(p) for p in paths[start:start + HEADER_CHUNK]]
              for start in range(0, len(paths), HEADER_CHUNK)]
    progress = bar(len(paths), "reading DICOM headers", unit="files")
    for path, result in zip(paths, _flat(_counted(run(read_headers, chunks), progress)), strict=True):
        file = path.relative_to(root).as_posix()
        rsna = RSNA_NAME.fullmatch(path.name)
        if isinstance(result, InstanceHeader):
            name = image_id(path) if rsna else result.instance_uid or file
            fields = dataclasses.asdict(result)
            del fields["image_id"]
            images.append(FolderImage(str(path), file, name, **fields))
        elif result[0] and not rsna:  # a README or a thumbnail beside the slices
            skipped[file] = result[1]
        else:
            images.append(FolderImage(str(path), file, image_id(path) if rsna else file))
            unreadable[file] = result[1]
    progress.close()
    if not images:
        raise DataError(f"{root}: no DICOM files there ({len(skipped)} other files); point --dicom-dir "
                        "at a folder of CT slices, e.g. a study export or Kaggle's stage_2_test/.")
    images.sort(key=_series_order)
    return Folder(root, images, unreadable, skipped)


def _series_order(image: FolderImage) -> tuple:
    """Study, series, then z (slices without one last), instance number and file name."""
    z = (math.isnan(image.z), 0.0 if math.isnan(image.z) else image.z)
    number = (image.instance_number is None, image.instance_number or 0)
    return image.study_uid, image.series_key, z, number, image.file


def read_headers(paths: list[str]) -> list[InstanceHeader | tuple[bool, str]]:
    """A header for each file, or (not DICOM at all?, reason); runs in a worker."""
    results = []
    for path in paths:
        try:
            results.append(read_instance_header(path))
        except DicomError as err:
            results.append((isinstance(err, NotDicomError), err.reason))
    return results


def decode(images: list[FolderImage], channel_spec: str | list, size: int,
           run: Runner) -> Iterator[tuple[FolderImage, np.ndarray | str]]:
    """(image, [C, S, S] channels or the reason it failed) for every image, in the order given."""
    paths = [image.path for image in images]
    chunks = [paths[start:start + DECODE_CHUNK] for start in range(0, len(paths), DECODE_CHUNK)]
    channels = parse_channels(channel_spec)
    if isinstance(run, Workers):
        slot = Slot((DECODE_CHUNK, len(channels), size, size), channel_dtype(channels).name)
        outputs = shared(run, decode_into, ((chunk, channels, size) for chunk in chunks), slot)
        results = _finished(chunks, outputs, channels, size)
    else:
        results = run(decode_files, [(chunk, channels, size) for chunk in chunks])
    return zip(images, _flat(results), strict=True)


def decode_files(task: tuple[list[str], tuple[Channel, ...], int],
                 interpolate: bool = True) -> list[np.ndarray | str | None]:
    """Each file's channels as training's cache holds them, or why it failed; None for a file only
    torch can resize, unless `interpolate` (see pool.py)."""
    paths, channels, size = task
    results = []
    for path in paths:
        try:
            hu = read_hu(path)
        except DicomError as err:
            results.append(err.reason)
            continue
        results.append(to_channels(hu, channels, size) if interpolate or not interpolates(hu.shape, size)
                       else None)
    return results


def decode_into(task: tuple[list[str], tuple[Channel, ...], int], slices: np.ndarray) -> list[str | bool]:
    """decode_files in a worker, the slices written to `slices` (shared memory): for each file why
    it failed, else whether it was written (not when only torch can resize it)."""
    results = decode_files(task, interpolate=False)
    for k, result in enumerate(results):
        if isinstance(result, np.ndarray):
            slices[k] = result
    return [result if isinstance(result, str) else result is not None for result in results]


def _finished(chunks: list[list[str]], outputs: Iterable[tuple[np.ndarray, list[str | bool]]],
              channels: tuple[Channel, ...], size: int) -> Iterator[list[np.ndarray | str]]:
    """Each chunk's slices as decode_into left them, those it could not resize decoded here."""
    for chunk, (slices, results) in zip(chunks, outputs, strict=True):
        yield [result if isinstance(result, str) else slices[k] if result
               else decode_files(([chunk[k]], channels, size))[0] for k, result in enumerate(results)]


def readers(workers: int | None) -> AbstractContextManager[Runner]:
    """run(function, tasks) -> results in task order, for `scan` and `decode`: `workers` processes
    (default: one per usable core), or this one for 1."""
    return pool.workers(workers, __name__)


def _counted(chunks: Iterable[list], progress: tqdm) -> Iterator[list]:
    for chunk in chunks:
        yield chunk
        progress.update(len(chunk))


def _flat(chunks: Iterable[list]) -> Iterator:
    for chunk in chunks:
        yield from chunk
