"""The preprocessed cache: every slice decoded once into a memory-mapped array at the target size.

Reading DICOM, converting to HU and resizing costs milliseconds per slice; a search reads each slice
thousands of times. So the driver decodes once, in parallel, into `images.npy`, and every trial
maps it read-only: the trials of a node share one copy in the page cache.

Layout of `<cache_dir>/<key>/`: images.npy [N, C, S, S] (uint8 windows or float16 HU),
index.npz (ids, labels, patient/study/series, z, valid), manifest.json. The key hashes the data
root, a fingerprint of its files and every preprocessing parameter, so a change builds a new cache
and never reads a stale one. That fingerprint stats every file, so it is remembered in
`<cache_dir>/<hash>.source` under the folder's own fingerprint (two stats) and computed again only
when that changes or on `--rescan`. A build writes into a temporary folder renamed into place at the end,
under a file lock, so an interrupted build never looks complete and two builds do not collide.
Its size is known before decoding, so a disk without room for it is refused before anything is
written: the array is mapped sparse, and a full disk would otherwise kill a worker with SIGBUS
half-way through.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock

from ich_tune.config.schema import DataConfig
from ich_tune.data import pool
from ich_tune.data.channels import channel_dtype, interpolates, parse_channels, to_channels
from ich_tune.data.dicom import DicomError, image_id, read_slice
from ich_tune.data.labels import read_labels
from ich_tune.data.rsna import LABELS_CSV, TRAIN_DIR
from ich_tune.errors import DataError
from ich_tune.files import atomic
from ich_tune.progress import bar

log = logging.getLogger(__name__)

CACHE_VERSION = 1
MISSING = "no DICOM file"  # the skip reason of a labelled image whose file is not there
DISK_MARGIN = 64 * 2**20  # left free after a build: the disk is shared with logs and checkpoints
INDEX_BYTES_PER_IMAGE = 1024  # index.npz: id, labels, valid, z and three UIDs of up to 64 characters
CHUNK = 64  # slices per task: enough to amortise its round trip, few enough to balance the workers
RACY_NS = 2 * 10**9  # a folder changed this recently may change again within its mtime's resolution


@dataclass
class Cache:
    """An opened cache: images stay on disk (read-only map); the index is small and in memory."""

    path: Path
    images: np.ndarray  # [N, C, S, S] memmap
    labels: np.ndarray  # [N, 6] uint8
    ids: np.ndarray
    patient_ids: np.ndarray
    study_uids: np.ndarray
    series_uids: np.ndarray
    z: np.ndarray
    valid: np.ndarray  # False where the slice could not be decoded
    manifest: dict

    def rows(self, indices: np.ndarray) -> Rows:
        """The images at `indices`, read one at a time when asked for (plots need only a few)."""
        return Rows(self.images, indices)


@dataclass
class Rows:
    array: np.ndarray
    indices: np.ndarray

    def __getitem__(self, i: int) -> np.ndarray:
        return self.array[self.indices[i]]

    def __len__(self) -> int:
        return len(self.indices)


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ich_tune"


def _dicom_folder(root: Path) -> Path:
    """root/stage_2_train; a root without it gets the same message from every check that meets it."""
    folder = root / TRAIN_DIR
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder. data.root must hold the Kaggle layout "
                        f"({TRAIN_DIR}/ID_<hex>.dcm and {LABELS_CSV}).")
    return folder


def find_dicom_files(root: Path) -> dict[str, Path]:
    """image id -> file, for stage_2_train/ID_*.dcm and .dcm.gz."""
    folder = _dicom_folder(root)
    files = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("ID_") and entry.name.endswith((".dcm", ".dcm.gz")):
                files[image_id(entry.name)] = Path(entry.path)
    return files


def cache_params(cfg: DataConfig, root: Path) -> dict:
    """Everything that changes the cache's bytes."""
    return {
        "version": CACHE_VERSION,
        "root": str(root.resolve()),
        "size": cfg.size,
        "channels": [dataclasses.asdict(c) for c in parse_channels(cfg.channels)],
        "max_images": cfg.max_images,
    }


def source_fingerprint(root: Path, files: dict[str, Path]) -> dict:
    """Sizes and modification times of the labels and the DICOM files, hashed: the full check, which
    stats every file (seconds at RSNA's 752,807 files); `folder_fingerprint` is what runs each time."""
    digest = hashlib.sha256()
    total = 0
    for name in sorted(files):
        stat = files[name].stat()
        total += stat.st_size
        digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    csv = (root / LABELS_CSV).stat()
    return {"files": len(files), "bytes": total, "csv_bytes": csv.st_size,
            "csv_mtime_ns": csv.st_mtime_ns, "sha256": digest.hexdigest()}


def folder_fingerprint(root: Path) -> dict:
    """Two stats, whatever the number of files: the DICOM folder (its mtime changes when a file is
    added, removed or renamed in it) and the labels CSV.

    It cannot see a file rewritten or touched in place, nor a change after which a tool set the
    folder's mtime back to its old value; `--rescan` runs the full check for those.
    """
    folder, csv = _dicom_folder(root), root / LABELS_CSV
    if not csv.is_file():
        raise DataError(f"{csv}: no such file; data.root must hold the Kaggle labels CSV.")
    folder_stat, csv_stat = folder.stat(), csv.stat()
    return {"folder": [folder_stat.st_ino, folder_stat.st_mtime_ns],
            "csv": [csv_stat.st_ino, csv_stat.st_size, csv_stat.st_mtime_ns]}


def ensure_cache(cfg: DataConfig, root: Path, rescan: bool = False) -> Path:
    """The cache folder for these data and parameters, built first if it does not exist yet.

    The key covers every file's size and mtime, and computing that stats every file: seconds at
    RSNA's scale, on every start. So the result is remembered beside the caches under the folder
    fingerprint, which costs two stats, and reused while that is unchanged; `rescan` runs the full
    check regardless (for files rewritten in place) and remembers its result.
    """
    params = cache_params(cfg, root)
    cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    checked_at = time.time_ns()
    folder = folder_fingerprint(root)
    remembered = cache_dir / f"{_digest([str(root.resolve()), folder])}.source"
    fingerprint = None if rescan else _read_json(remembered)
    if fingerprint is not None:
        known = cache_dir / _digest([params, fingerprint])
        if (known / "manifest.json").is_file():
            return _checked(known, cfg, root)
    files = find_dicom_files(root)
    fingerprint = source_fingerprint(root, files)
    key = _digest([params, fingerprint])
    final = cache_dir / key
    if not (final / "manifest.json").is_file():
        _build_once(cfg, root, files, params, fingerprint, cache_dir, key)
    _checked(final, cfg, root)
    if folder_fingerprint(root) == folder and not _racy(folder, checked_at):
        with atomic(remembered) as partial:
            partial.write_text(json.dumps(fingerprint))
    return final


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def _racy(folder: dict, checked_at: int) -> bool:
    """Whether a change could have kept the fingerprint taken at `checked_at`: file systems store times
    coarsely, so a file added in the same tick as the last change leaves the folder's mtime as it was.
    Not remembered then; the next start runs the full check again."""
    newest = max(folder["folder"][-1], folder["csv"][-1])
    return checked_at - newest < RACY_NS


def _build_once(cfg: DataConfig, root: Path, files: dict[str, Path], params: dict, fingerprint: dict,
                cache_dir: Path, key: str) -> None:
    """Build the cache of `key` unless another process does or did; see the module's docstring."""
    final = cache_dir / key
    plan = _plan(cfg, root, files)
    free = _check_room(cache_dir, key, plan.disk_bytes)  # before anything is created
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(cache_dir / f"{key}.lock"):  # a second builder waits here, then finds it complete
        if (final / "manifest.json").is_file():
            return
        for stale in cache_dir.glob(f"{key}.partial-*"):  # left by a build that was killed
            shutil.rmtree(stale, ignore_errors=True)
        partial = cache_dir / f"{key}.partial-{os.getpid()}"
        try:
            _build(cfg, root, plan, free, partial, params, fingerprint)
            _checked(partial, cfg, root)
            os.rename(partial, final)
        finally:
            shutil.rmtree(partial, ignore_errors=True)


def _checked(folder: Path, cfg: DataConfig, root: Path) -> Path:
    """The cache folder, unless more of its slices failed to decode than data.max_bad_fraction allows.

    Checked on every use, not only at build time: the fraction is no cache parameter, so a cache built
    under a looser limit must not slip past a stricter one.
    """
    manifest = json.loads((folder / "manifest.json").read_text())
    bad = manifest["images"] - manifest["decoded"]
    if bad > cfg.max_bad_fraction * manifest["images"]:
        failures = [f"{k}: {v}" for k, v in manifest["skipped"].items() if v != MISSING]
        raise DataError(f"{root}: {bad} of {manifest['images']} slices could not be decoded, more than "
                        f"data.max_bad_fraction={cfg.max_bad_fraction}. First: {'; '.join(failures[:3])}. "
                        "Fix the files or raise data.max_bad_fraction.")
    return folder


@dataclass
class _Plan:
    """What a build will write, known from the labels CSV before any slice is decoded."""

    ids: np.ndarray
    labels: np.ndarray
    missing: list[str]  # labelled ids without a file
    paths: list[str]
    shape: tuple[int, int, int, int]  # of images.npy
    dtype: np.dtype

    @property
    def disk_bytes(self) -> int:
        """Bytes on disk once built: the image array (plus its header), the index and the manifest."""
        images = int(np.prod(self.shape)) * self.dtype.itemsize + 4096
        return images + len(self.ids) * INDEX_BYTES_PER_IMAGE + len(self.missing) * 64 + 2**16


def _plan(cfg: DataConfig, root: Path, files: dict[str, Path]) -> _Plan:
    labels = read_labels(root / LABELS_CSV)
    keep = np.array([i in files for i in labels.ids], dtype=bool)
    missing = [str(i) for i in labels.ids[~keep]]
    ids, y = labels.ids[keep], labels.y[keep]
    if cfg.max_images:
        ids, y = ids[: cfg.max_images], y[: cfg.max_images]
    if len(ids) == 0:
        raise DataError(f"{root}: none of the {len(labels.ids)} labelled images has a file in {TRAIN_DIR}/.")
    channels = parse_channels(cfg.channels)
    return _Plan(ids=ids, labels=y, missing=missing, paths=[str(files[i]) for i in ids],
                 shape=(len(ids), len(channels), cfg.size, cfg.size), dtype=channel_dtype(channels))


def _check_room(cache_dir: Path, key: str, needed: int) -> int:
    """Free bytes for a build of `needed` bytes into cache_dir; a DataError when they are too few.

    Measured on the nearest folder that exists, since cache_dir itself may not yet. Leftovers of a
    killed build of this key count as free: the build removes them first.
    """
    anchor = cache_dir.absolute()
    while not anchor.exists():
        anchor = anchor.parent
    leftovers = sum(_allocated_bytes(p) for p in cache_dir.glob(f"{key}.partial-*"))
    free = shutil.disk_usage(anchor).free + leftovers
    if needed + DISK_MARGIN > free:
        counted = f", counting {_size(leftovers)} left by an interrupted build" if leftovers else ""
        raise DataError(
            f"{cache_dir}: not enough disk space for the preprocessed cache. It needs about "
            f"{_size(needed)} ({needed:,} bytes) plus a margin of {_size(DISK_MARGIN)}, and "
            f"{_size(free)} ({free:,} bytes) is free on the disk of {anchor}{counted}. Free some "
            "space there, or set data.cache_dir to a folder on a disk with more room.")
    return free


def _allocated_bytes(folder: Path) -> int:
    """Disk blocks held by the files of a folder (a sparse array holds only what was written)."""
    total = 0
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                total += entry.stat(follow_symlinks=False).st_blocks * 512
    except OSError:  # gone meanwhile, or not a folder: nothing to count
        pass
    return total


def _size(count: float) -> str:
    """A byte count for people: 1536 -> '1.5 KiB'."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def _build(cfg: DataConfig, root: Path, plan: _Plan, free: int, out: Path, params: dict,
           fingerprint: dict) -> None:
    started = time.perf_counter()
    ids, y, missing, paths = plan.ids, plan.labels, plan.missing, plan.paths
    out.mkdir(parents=True)
    np.lib.format.open_memmap(out / "images.npy", mode="w+", dtype=plan.dtype, shape=plan.shape)
    workers = cfg.workers or len(os.sched_getaffinity(0))  # usable cores, as a cpuset limits them
    _, channels, size, _ = plan.shape
    log.info(f"preprocess: {len(ids)} slices of {root} -> {out.parent} "
             f"({channels}x{size}x{size} {plan.dtype.name}, {workers} processes; "
             f"about {_size(plan.disk_bytes)} on disk, {_size(free)} free)")
    headers: list = [None] * len(ids)
    skipped: dict[str, str] = dict.fromkeys(missing, MISSING)
    images = str(out / "images.npy")
    chunks = [(images, start, paths[start:start + CHUNK], cfg.channels, cfg.size)
              for start in range(0, len(paths), CHUNK)]
    decoding = time.perf_counter()
    progress = bar(len(paths), "preprocess")
    with pool.workers(workers, __name__) as run:
        for results, left in run(_decode_chunk, chunks):
            for index in left:  # here, where torch is imported once rather than in every worker
                results += _decode_chunk((images, index, [paths[index]], cfg.channels, cfg.size), True)[0]
            for index, header, reason in results:
                headers[index] = header
                if reason:
                    skipped[str(ids[index])] = reason
            progress.update(len(results))
    progress.close()
    seconds = time.perf_counter() - decoding
    bad = [h is None for h in headers]
    blank = ("", "", "", float("nan"))
    rows = [h[1:] if h else blank for h in headers]
    np.savez(out / "index.npz", ids=ids, labels=y, valid=~np.array(bad),
             patient_ids=np.array([r[0] for r in rows]), study_uids=np.array([r[1] for r in rows]),
             series_uids=np.array([r[2] for r in rows]), z=np.array([r[3] for r in rows], dtype=np.float64))
    manifest = {
        "params": params, "fingerprint": fingerprint, "images": len(ids), "decoded": len(ids) - sum(bad),
        "skipped": skipped, "labelled_without_file": len(missing),
        "bytes": (out / "images.npy").stat().st_size, "seconds": round(time.perf_counter() - started, 2),
        "decode_seconds": round(seconds, 2), "built": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if skipped:
        log.info(f"preprocess: skipped {len(skipped)} images (listed in {out.parent}/<key>/manifest.json)")


def _decode_chunk(task: tuple, interpolate: bool = False) -> tuple[list[tuple], list[int]]:
    """(index, header, reason it failed) of each slice decoded into the memory-mapped array, and
    the indices of those left undecoded because only torch can resize them (see pool.py), unless
    `interpolate`."""
    images_path, start, paths, channel_spec, size = task
    images = np.load(images_path, mmap_mode="r+")
    channels = parse_channels(channel_spec)
    results, left = [], []
    for index, path in enumerate(paths, start):
        try:
            header, hu = read_slice(path)
        except DicomError as err:
            results.append((index, None, err.reason))
            continue
        if interpolates(hu.shape, size) and not interpolate:
            left.append(index)
        else:
            images[index] = to_channels(hu, channels, size)
            results.append((index, dataclasses.astuple(header), None))
    return results, left


def open_cache(path: Path) -> Cache:
    """Open a built cache read-only (images memory-mapped, never copied)."""
    manifest = json.loads((path / "manifest.json").read_text())
    index = np.load(path / "index.npz")
    return Cache(path=path, images=np.load(path / "images.npy", mmap_mode="r"),
                 labels=index["labels"], ids=index["ids"], patient_ids=index["patient_ids"],
                 study_uids=index["study_uids"], series_uids=index["series_uids"], z=index["z"],
                 valid=index["valid"], manifest=manifest)
