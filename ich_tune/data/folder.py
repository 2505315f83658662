"""Any folder tree of DICOM files, as a scanner or PACS exports it, read by a pool of processes.

A file is DICOM by what it holds (dicom.py's rules: the 'DICM' marker, or a bare data set with a
SOP Class UID), never by its name: exports name files `IM000001`, `0001.dcm` or nothing at all,
and nest them study/series. Headers are read first, to name every image and rebuild its series;
pixels are decoded afterwards, series after series, so a model given neighbouring slices gets a
whole series at once. Both passes run in worker processes, as the cache build does: decoding
costs milliseconds of CPU per slice, and with one process it would leave the other cores idle.
Decoded slices come back through shared memory, as the cache build's go to its memory-mapped
file, and only a few bytes per chunk through the pool's result pipe. Pickled through that pipe, a
chunk of slices takes many reads to arrive, and all that while the pool's worker-watching thread,
which also waits on the pipe, finds it readable and spins: on 2 cores the pool then read 0.6x one
process's images/s at 10 ms of CPU per image, against 1.8x at 4 ms through shared memory.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import multiprocessing.pool
import os
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import numpy as np

from ich_tune.data.channels import Channel, channel_dtype, parse_channels, to_channels
from ich_tune.data.dicom import (
    DicomError,
    InstanceHeader,
    NotDicomError,
    image_id,
    read_hu,
    read_instance_header,
)
from ich_tune.errors import DataError
from ich_tune.progress import Progress

RSNA_NAME = re.compile(r"ID_[0-9A-Za-z]+\.dcm(\.gz)?")  # Kaggle's ids are hex; any ID_<word>.dcm as before
HEADER_CHUNK, DECODE_CHUNK = 64, 8  # files per task: enough to amortise the pickling, few enough to balance
AHEAD = 4  # tasks in flight per worker: keeps the workers busy while decoded slices wait for the model

Runner = Callable[[Callable, Iterable], Iterator]


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
    progress = Progress(len(paths), "reading DICOM headers", unit="files")
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
        results = _decode_shared(run, chunks, channels, size)
    else:
        results = run(decode_files, [(chunk, channels, size) for chunk in chunks])
    return zip(images, _flat(results), strict=True)


def decode_files(task: tuple[list[str], tuple[Channel, ...], int]) -> list[np.ndarray | str]:
    """Each file's channels as training's cache holds them, or why it failed."""
    paths, channels, size = task
    results = []
    for path in paths:
        try:
            results.append(to_channels(read_hu(path), channels, size))
        except DicomError as err:
            results.append(err.reason)
    return results


@dataclass
class Workers:
    """Worker processes that run tasks in order, at most `ahead` in flight, so that decoded slices
    never pile up in memory while the model is slower than the workers."""

    pool: multiprocessing.pool.Pool
    ahead: int

    def __call__(self, function: Callable, tasks: Iterable) -> Iterator:
        pending = deque()
        for task in tasks:
            pending.append(self.pool.apply_async(function, (task,)))
            if len(pending) >= self.ahead:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


@contextmanager
def readers(workers: int | None) -> Iterator[Runner]:
    """run(function, tasks) -> results in task order: `workers` processes, or this one for 1.

    Processes fork from a forkserver that imported this module once, as in the cache build, and
    keep to one thread each. The forkserver imports torch too, which a slice of an odd size needs
    to be resized: imported there once rather than in every worker, it costs no CPU per worker
    (imported by each of two workers, it took 40% more CPU per image than one process did, over
    800 slices).
    """
    workers = workers or len(os.sched_getaffinity(0))  # usable cores, as a cpuset limits them
    if workers == 1:
        yield map
        return
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, "torch"])
    with context.Pool(workers, initializer=_one_thread) as pool:
        yield Workers(pool, AHEAD * workers)


def _decode_shared(run: Workers, chunks: list[list[str]], channels: tuple[Channel, ...],
                   size: int) -> Iterator[list[np.ndarray | str]]:
    """decode_files in the workers, each chunk's slices written to one of `run.ahead` slots of
    shared memory: a slot is reused only once its chunk has been copied out, as `run` submits a
    task only after taking the result `ahead` tasks before it."""
    slot = Slot(channels, size, DECODE_CHUNK)
    memory = SharedMemory(create=True, size=run.ahead * slot.bytes)
    try:
        tasks = ((chunk, slot, memory.name, index % run.ahead) for index, chunk in enumerate(chunks))
        for index, reasons in enumerate(run(decode_into, tasks)):
            yield slot.copied(memory, index % run.ahead, reasons)
    finally:
        memory.close()
        memory.unlink()


@dataclass(frozen=True)
class Slot:
    """Where one chunk's decoded slices lie in the shared memory: `images` of [C, size, size]."""

    channels: tuple[Channel, ...]
    size: int
    images: int

    @property
    def bytes(self) -> int:
        return self.images * len(self.channels) * self.size ** 2 * channel_dtype(self.channels).itemsize

    def view(self, memory: SharedMemory, index: int) -> np.ndarray:
        shape = (self.images, len(self.channels), self.size, self.size)
        return np.ndarray(shape, channel_dtype(self.channels), memory.buf, offset=index * self.bytes)

    def copied(self, memory: SharedMemory, index: int, reasons: list[str | None]) -> list[np.ndarray | str]:
        """The chunk's slices copied out of slot `index` (no view may outlive the shared memory), or
        the reasons they failed."""
        slices = self.view(memory, index)
        return [reason or slices[k].copy() for k, reason in enumerate(reasons)]


_attached: dict[str, SharedMemory] = {}  # in a worker: the shared memory of the decode under way


def decode_into(task: tuple[list[str], Slot, str, int]) -> list[str | None]:
    """decode_files in a worker, the slices written to slot `index` of the shared memory `name`;
    None for a slice written, else why it failed."""
    paths, slot, name, index = task
    if name not in _attached:  # a new decode: the previous one's memory is no longer needed
        for memory in _attached.values():
            memory.close()
        _attached.clear()
        _attached[name] = SharedMemory(name)
    slices = slot.view(_attached[name], index)
    results = decode_files((paths, slot.channels, slot.size))
    for k, result in enumerate(results):
        if not isinstance(result, str):
            slices[k] = result
    return [result if isinstance(result, str) else None for result in results]


def _one_thread() -> None:
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def _counted(chunks: Iterable[list], progress: Progress) -> Iterator[list]:
    for chunk in chunks:
        yield chunk
        progress.update(len(chunk))


def _flat(chunks: Iterable[list]) -> Iterator:
    for chunk in chunks:
        yield from chunk
