"""The preprocessed cache and data preparation, on real DICOM files from the synthetic generator.

What must hold: cached pixels and labels are exactly what decoding the files gives; a cache is
reused only while nothing that shapes its bytes has changed; a killed or failed build never looks
complete; a second builder waits for the first and uses its cache; a disk without room is refused
before anything is written; bad images are skipped and counted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ich_tune.config.schema import DataConfig, SyntheticConfig
from ich_tune.data.cache import DISK_MARGIN, ensure_cache, find_dicom_files, open_cache
from ich_tune.data.channels import parse_channels, to_channels
from ich_tune.data.dicom import read_header, read_hu
from ich_tune.data.labels import read_labels
from ich_tune.data.prepare import prepare_cache, resolve_root
from ich_tune.data.rsna import LABELS_CSV, TRAIN_DIR
from ich_tune.data.synthetic import generate
from ich_tune.errors import DataError

# RSNA's "ID_<hex>" UIDs are not valid DICOM UIDs; pydicom warns on every read, as with real data
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")

REPO = Path(__file__).resolve().parents[1]
# 72 slices: two decode chunks of 64, so parallel workers write disjoint parts of one array
DATA = dict(studies=8, slices=9, size=64, seed=0, positive_rate=0.4, quirk_rate=0.2)
WINDOWS = ["brain", "subdural", "bone"]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
BUILD = """
import sys
from pathlib import Path
from ich_tune.config.schema import DataConfig
from ich_tune.data.cache import ensure_cache
root, cache_dir = sys.argv[1:]
cfg = DataConfig(root=root, cache_dir=cache_dir, full_size=64, workers=1, max_bad_fraction=0.5)
print("result", ensure_cache(cfg, Path(root)), flush=True)
"""


def config(root: Path, cache_dir: Path, **changes) -> DataConfig:
    """64 px, one worker (the machine may have two shared cores), the corrupt file tolerated."""
    base = DataConfig(root=str(root), cache_dir=str(cache_dir), full_size=64, workers=1, max_bad_fraction=0.5)
    return dataclasses.replace(base, **changes)


def complete_folders(cache_dir: Path) -> list[Path]:
    return [p for p in cache_dir.iterdir() if (p / "manifest.json").is_file()]


def partial_folders(cache_dir: Path) -> list[Path]:
    return [p for p in cache_dir.iterdir() if ".partial-" in p.name]


class Builder:
    """ensure_cache in a child process of its own session, output to a file; kill() ends its group.

    A context manager, so that a failing test never leaves the builder or its pool workers behind.
    """

    def __init__(self, root: Path, cache_dir: Path, log: Path) -> None:
        self.log = log
        with open(log, "w") as out:  # the child keeps its own handle
            self.process = subprocess.Popen(
                [sys.executable, "-c", BUILD, str(root), str(cache_dir)], env=ENV, stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def output(self) -> str:
        return self.log.read_text()

    def kill(self) -> int:
        """SIGKILL to the whole group (the pool's workers too); the builder's exit status."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.wait()

    def __enter__(self) -> Builder:
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


def open_once_read(pipe: Path, builder: Builder) -> int:
    """The write end of a named pipe, opened once the builder's decoder has opened it to read.

    From then on the decoder blocks reading it for as long as the caller holds this end and writes
    nothing: the build is held at a known point, mid-decoding.
    """
    deadline = time.monotonic() + 120
    while True:
        try:
            return os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as err:
            if err.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
        assert builder.process.poll() is None, f"the build ended first:\n{builder.output}"
        assert time.monotonic() < deadline, f"the build never read the pipe:\n{builder.output}"
        time.sleep(0.01)


def refused_flocks(monkeypatch) -> threading.Event:
    """Set once a flock is refused to one that asked without blocking, as filelock asks while it waits."""
    refused = threading.Event()
    real = fcntl.flock

    def flock(fd, operation) -> None:
        try:
            real(fd, operation)
        except BlockingIOError:
            refused.set()
            raise

    monkeypatch.setattr(fcntl, "flock", flock)
    return refused


def size_in_bytes(number: str, unit: str) -> float:
    """'149.0', 'KiB' -> 152576.0, for the sizes the build prints."""
    return float(number) * 1024 ** ["bytes", "KiB", "MiB", "GiB", "TiB"].index(unit)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("rsna")
    return root, generate(root, **DATA)


@pytest.fixture(scope="module")
def hu_cache(data, tmp_path_factory) -> Path:
    root, _ = data
    return ensure_cache(config(root, tmp_path_factory.mktemp("cache"), workers=2), root)


@pytest.fixture
def fresh_data(tmp_path) -> Path:
    """A dataset of its own, for tests that change files; no corrupt file."""
    root = tmp_path / "rsna"
    generate(root, studies=3, slices=3, size=64, seed=5, positive_rate=0.4, quirk_rate=0.0)
    return root


def test_hu_cache_equals_decoding_every_file(data, hu_cache):
    root, _ = data
    cache = open_cache(hu_cache)
    labels = read_labels(root / LABELS_CSV)
    files = find_dicom_files(root)
    assert cache.images.shape == (len(files), 1, 64, 64)
    assert cache.images.dtype == np.float16
    assert list(cache.ids) == list(labels.ids)
    np.testing.assert_array_equal(cache.labels, labels.y)
    channels = parse_channels("hu")
    for index in np.flatnonzero(cache.valid):
        path = files[cache.ids[index]]
        np.testing.assert_array_equal(cache.images[index], to_channels(read_hu(path), channels, 64))
        header = read_header(path)
        assert (cache.patient_ids[index], cache.study_uids[index], cache.series_uids[index]) == (
            header.patient_id, header.study_uid, header.series_uid)
        assert cache.z[index] == header.z


def test_window_cache_is_uint8_and_equals_decoding(data, tmp_path):
    root, _ = data
    cache = open_cache(ensure_cache(config(root, tmp_path, channels=WINDOWS, lod=1), root))
    assert cache.images.shape == (len(cache.ids), 3, 32, 32)
    assert cache.images.dtype == np.uint8
    files = find_dicom_files(root)
    for index in np.flatnonzero(cache.valid)[::9]:
        expected = to_channels(read_hu(files[cache.ids[index]]), parse_channels(WINDOWS), 32)
        np.testing.assert_array_equal(cache.images[index], expected)


def test_second_call_reuses_the_cache(data, hu_cache, said):
    root, _ = data
    manifest = hu_cache / "manifest.json"

    def state() -> tuple:  # the caches; a second call may remember the data's fingerprint (.source)
        entries = sorted(p for p in hu_cache.parent.iterdir() if p.suffix != ".source")
        return manifest.stat().st_mtime_ns, entries

    before = state()
    again = ensure_cache(config(root, hu_cache.parent, workers=2), root)
    assert again == hu_cache
    assert state() == before
    assert said == []


def test_what_changes_the_bytes_changes_the_key(fresh_data, tmp_path, said):
    """Every input of the cache's bytes gets its own folder; settings that do not, share one."""
    base = config(fresh_data, tmp_path / "cache", channels=["brain", "bone"])

    def folder(cfg: DataConfig = base, rescan: bool = False) -> Path:
        return ensure_cache(cfg, fresh_data, rescan)

    def builds() -> int:
        return sum(line.startswith("preprocess: ") and "slices of" in line for line in said)

    first = folder()
    same = [dataclasses.replace(base, **change) for change in (
        {"augment": True}, {"balanced": True}, {"train_fraction": 0.5}, {"split_seed": 3},
        {"folds": 5, "fold": 2}, {"workers": 2})]
    assert all(folder(cfg) == first for cfg in same)
    assert builds() == 1

    seen = {first}
    variants = [{"channels": ["brain"]}, {"channels": ["bone", "brain"]}, {"channels": "hu"},
                {"lod": 1}, {"full_size": 128}, {"max_images": 4}]
    for change in variants:
        path = folder(dataclasses.replace(base, **change))
        assert path not in seen, change
        seen.add(path)

    dicoms = sorted((fresh_data / TRAIN_DIR).glob("*.dcm"))
    csv = fresh_data / LABELS_CSV

    def touch() -> None:  # same bytes, a later modification time
        stat = dicoms[0].stat()
        os.utime(dicoms[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))

    # a file touched in place leaves its folder as it was: only the full check (--rescan) sees it
    def add() -> None:
        shutil.copy(dicoms[1], dicoms[1].with_name("ID_0123456789.dcm"))

    for source_change, rescan in ((touch, True), (add, False),
                                  (lambda: csv.write_text(csv.read_text() + "\n"), False)):
        source_change()
        path = folder(rescan=rescan)
        assert path not in seen
        seen.add(path)
        assert folder() == path
    assert builds() == len(seen) == len(complete_folders(tmp_path / "cache"))


def test_changed_file_is_never_read_stale(fresh_data, tmp_path):
    cfg = config(fresh_data, tmp_path)
    old = open_cache(ensure_cache(cfg, fresh_data))
    files = find_dicom_files(fresh_data)
    target, source = old.ids[0], old.ids[1]
    shutil.copyfile(files[source], files[target])  # same size, other pixels
    new = open_cache(ensure_cache(cfg, fresh_data, rescan=True))  # rewritten in place: --rescan
    assert new.path != old.path
    expected = to_channels(read_hu(files[source]), parse_channels("hu"), 64)
    assert not np.array_equal(old.images[0], expected)
    np.testing.assert_array_equal(new.images[0], expected)


def test_killed_build_never_looks_complete(fresh_data, tmp_path, said):
    """A build held mid-decoding (a worker blocked reading a named pipe) and killed there with SIGKILL
    to its process group leaves no complete cache; the next build removes its leftovers and succeeds."""
    files = find_dicom_files(fresh_data)
    pipe_id = sorted(files)[4]
    pipe = files[pipe_id]
    pipe.unlink()
    os.mkfifo(pipe)
    cache_dir = tmp_path / "cache"
    with Builder(fresh_data, cache_dir, tmp_path / "builder.log") as builder:
        writer = open_once_read(pipe, builder)
        try:
            assert builder.process.poll() is None  # held: the decoder waits on the pipe
            assert complete_folders(cache_dir) == []
            [left] = partial_folders(cache_dir)
            assert (left / "images.npy").is_file()
        finally:
            status = builder.kill()
            os.close(writer)
    assert status == -signal.SIGKILL
    assert not any(line.startswith("result ") for line in builder.output.splitlines())
    assert complete_folders(cache_dir) == []
    assert partial_folders(cache_dir) == [left]
    # a build killed between writing its manifest and the rename: still not complete
    key = left.name.split(".partial-")[0]
    planted = left.with_name(f"{key}.partial-123")
    planted.mkdir()
    (planted / "manifest.json").write_text("{}")

    # The pipe becomes an empty file of the same size and time, so the key, and with it the leftovers
    # to clean, stay the same; that slice is then skipped as unreadable.
    stat = pipe.stat()
    pipe.unlink()
    pipe.touch()
    os.utime(pipe, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    path = ensure_cache(config(fresh_data, cache_dir), fresh_data)
    assert any(line.startswith("preprocess:") for line in said)  # rebuilt, not adopted
    assert path.name == key
    assert complete_folders(cache_dir) == [path]
    assert partial_folders(cache_dir) == []
    manifest = open_cache(path).manifest
    assert manifest["images"] == len(files) and manifest["decoded"] == len(files) - 1
    assert list(manifest["skipped"]) == [pipe_id]
    assert manifest["skipped"][pipe_id].startswith("not a DICOM file")


def test_second_builder_waits_for_the_lock_and_uses_the_first_cache(fresh_data, tmp_path, monkeypatch, said):
    """The test plays the first builder: it holds the key's lock while the cache is not complete.
    The second must wait for the lock, build nothing, and once the lock is released find the cache."""
    cache_dir = tmp_path / "cache"
    cfg = config(fresh_data, cache_dir)
    path = ensure_cache(cfg, fresh_data)
    built = (path / "manifest.json").stat().st_mtime_ns
    aside = tmp_path / "aside"
    path.rename(aside)  # not complete any more, as while the first build runs
    said.clear()
    outcome: dict = {}

    def second_builder() -> None:
        try:
            outcome["path"] = ensure_cache(cfg, fresh_data)
        except BaseException as err:
            outcome["error"] = err

    thread = threading.Thread(target=second_builder, daemon=True)
    with open(cache_dir / f"{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        refused = refused_flocks(monkeypatch)
        try:
            thread.start()
            deadline = time.monotonic() + 60
            while not refused.wait(0.01):
                assert thread.is_alive(), f"the second builder did not wait: {outcome}"
                assert time.monotonic() < deadline, "the second builder never waited for the lock"
            assert thread.is_alive() and outcome == {}
            assert said == [] and partial_folders(cache_dir) == [] and complete_folders(cache_dir) == []
            aside.rename(path)  # the first build finishes: its cache is in place
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    thread.join(120)
    assert not thread.is_alive()
    assert outcome == {"path": path}
    assert said == []  # found complete, not built a second time
    assert (path / "manifest.json").stat().st_mtime_ns == built
    assert complete_folders(cache_dir) == [path]
    assert partial_folders(cache_dir) == []


def test_build_prints_its_size_estimate(fresh_data, tmp_path, said):
    path = ensure_cache(config(fresh_data, tmp_path / "cache"), fresh_data)
    [line] = [line for line in said if line.startswith("preprocess: ") and "slices of" in line]
    found = re.search(r"; about ([\d.]+) (\w+) on disk, ([\d.]+) (\w+) free\)$", line)
    assert found, line
    estimate, free = size_in_bytes(*found.group(1, 2)), size_in_bytes(*found.group(3, 4))
    written = sum(f.stat().st_size for f in path.iterdir())
    assert (path / "images.npy").stat().st_size == 9 * 1 * 64 * 64 * 2 + 128  # N x C x S x S x 2, header
    assert written <= estimate <= written + 2**20  # never short, and close: no room wasted
    assert free > estimate


@pytest.mark.parametrize("existing", [False, True], ids=["new-folder", "existing-folder"])
def test_disk_without_room_is_refused_before_anything_is_written(fresh_data, tmp_path, monkeypatch,
                                                                 existing):
    cache_dir = tmp_path / "disk" / "cache"
    if existing:
        cache_dir.mkdir(parents=True)
    asked = []
    real = shutil.disk_usage(tmp_path)

    def tiny_disk(path):  # the operating system's answer for a nearly full disk
        asked.append(Path(path))
        return real._replace(free=4096)

    monkeypatch.setattr(shutil, "disk_usage", tiny_disk)
    with pytest.raises(DataError) as caught:
        ensure_cache(config(fresh_data, cache_dir), fresh_data)
    message = str(caught.value)
    assert message.startswith(f"{cache_dir}: not enough disk space for the preprocessed cache.")
    needed = int(re.search(r"needs about [\d.]+ \w+ \(([\d,]+) bytes\)", message).group(1).replace(",", ""))
    assert 9 * 64 * 64 * 2 < needed < 2**20  # the image array and a little more
    assert "(4,096 bytes) is free" in message
    assert "Free some space there, or set data.cache_dir to a folder on a disk with more room." in message
    assert asked == [cache_dir if existing else tmp_path]  # the nearest folder that exists
    if existing:
        assert list(cache_dir.iterdir()) == []  # no lock file, no partial folder
    else:
        assert not (tmp_path / "disk").exists()


def test_leftovers_of_a_killed_build_count_as_room(fresh_data, tmp_path, monkeypatch):
    """A killed build's partial folder is removed before building, so its blocks are room: a rerun on
    a disk it filled must not be refused."""
    cache_dir = tmp_path / "cache"
    cfg = config(fresh_data, cache_dir)
    elsewhere = dataclasses.replace(cfg, cache_dir=str(tmp_path / "elsewhere"))
    key = ensure_cache(elsewhere, fresh_data).name  # the same key: cache_dir is not part of it
    real = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real._replace(free=0))
    with pytest.raises(DataError) as caught:
        ensure_cache(cfg, fresh_data)
    needed = int(re.search(r"\(([\d,]+) bytes\) plus", str(caught.value)).group(1).replace(",", ""))
    leftover = cache_dir / f"{key}.partial-99999"
    leftover.mkdir(parents=True)
    (leftover / "images.npy").write_bytes(b"\1" * (needed + DISK_MARGIN))  # real blocks, not sparse
    assert ensure_cache(cfg, fresh_data) == cache_dir / key
    assert partial_folders(cache_dir) == []


def test_corrupt_file_is_skipped_and_listed(data, hu_cache):
    _, summary = data
    [truncated] = summary["truncated"]
    cache = open_cache(hu_cache)
    assert list(cache.manifest["skipped"]) == [truncated]
    assert "truncated pixel data" in cache.manifest["skipped"][truncated]
    assert list(cache.ids[~cache.valid]) == [truncated]
    assert cache.manifest["decoded"] == cache.manifest["images"] - 1
    assert cache.manifest["labelled_without_file"] == 0


def test_too_many_bad_images_fail_without_a_cache(data, tmp_path):
    root, _ = data
    strict = 0.5 / len(find_dicom_files(root))  # the one corrupt file is already too many
    with pytest.raises(DataError, match="max_bad_fraction") as caught:
        ensure_cache(config(root, tmp_path, max_bad_fraction=strict), root)
    assert "truncated pixel data" in str(caught.value)
    assert complete_folders(tmp_path) == []
    assert partial_folders(tmp_path) == []


def test_bad_fraction_error_shows_the_undecodable_files(tmp_path):
    """Missing files are listed in `skipped` too, but the error is about decoding: its examples
    must be the files that failed to decode, not the first missing ones."""
    root = tmp_path / "rsna"
    [truncated] = generate(root, **DATA)["truncated"]
    files = find_dicom_files(root)
    for gone in [name for name in sorted(files) if name != truncated][:3]:
        files[gone].unlink()
    with pytest.raises(DataError, match="max_bad_fraction") as caught:
        ensure_cache(config(root, tmp_path / "cache", max_bad_fraction=0.001), root)
    assert f"{truncated}: truncated pixel data" in str(caught.value)


def test_stricter_max_bad_fraction_applies_to_an_existing_cache(data, hu_cache):
    """The threshold is policy, not part of the key: a cache built under a looser one must not
    let a run with a stricter one go ahead on more bad images than it allows."""
    root, _ = data
    strict = 0.5 / len(find_dicom_files(root))
    with pytest.raises(DataError, match="max_bad_fraction"):
        ensure_cache(config(root, hu_cache.parent, max_bad_fraction=strict), root)


def test_labelled_image_without_a_file_is_counted(fresh_data, tmp_path):
    files = find_dicom_files(fresh_data)
    gone = sorted(files)[2]
    files[gone].unlink()
    cache = open_cache(ensure_cache(config(fresh_data, tmp_path), fresh_data))
    assert cache.manifest["labelled_without_file"] == 1
    assert cache.manifest["skipped"] == {gone: "no DICOM file"}
    assert gone not in set(cache.ids)
    assert cache.manifest["images"] == len(cache.ids) == len(files) - 1
    assert cache.valid.all()


def test_open_cache_maps_images_read_only(hu_cache):
    cache = open_cache(hu_cache)
    assert isinstance(cache.images, np.memmap)
    with pytest.raises(ValueError, match="read-only"):
        cache.images[0, 0, 0, 0] = 1


def test_prepare_generates_synthetic_data_once(tmp_path, said):
    root = tmp_path / "new"
    synthetic = SyntheticConfig(studies=2, slices=3, size=32, seed=1, quirk_rate=0.0)
    cfg = config(root, tmp_path / "cache", synthetic=synthetic, full_size=32)
    path = prepare_cache(cfg)
    assert any("synthetic" in line and str(root) in line for line in said)
    assert open_cache(path).images.shape == (6, 1, 32, 32)
    csv_mtime = (root / LABELS_CSV).stat().st_mtime_ns
    said.clear()
    assert prepare_cache(cfg) == path
    assert said == []
    assert (root / LABELS_CSV).stat().st_mtime_ns == csv_mtime


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="--data-root"):
        resolve_root(DataConfig())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as caught:
        resolve_root(DataConfig(root=str(empty)))
    message = str(caught.value)
    assert str(empty) in message and LABELS_CSV in message
    assert f"demo-data --out {empty}" in message
    assert list(empty.iterdir()) == []  # nothing generated without data.synthetic


def test_synthetic_data_is_never_written_into_a_foreign_folder(tmp_path):
    """A folder with DICOM files but no labels CSV (a download in progress, a renamed CSV) must not
    get synthetic slices mixed into it just because the experiment also sets data.synthetic."""
    other = tmp_path / "other"
    generate(other, studies=2, slices=2, size=32, quirk_rate=0.0)
    root = tmp_path / "rsna"
    shutil.copytree(other / TRAIN_DIR, root / TRAIN_DIR)  # the slices, not their CSV
    before = sorted(root.rglob("*"))
    cfg = DataConfig(root=str(root), synthetic=SyntheticConfig(studies=2, slices=1, size=32))
    with pytest.raises(DataError, match=re.escape(str(root))):
        resolve_root(cfg)
    assert sorted(root.rglob("*")) == before
