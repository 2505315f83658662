"""Finding an existing cache: two stats for an unchanged dataset, the full check on a change or --rescan.

On real DICOM files from the synthetic generator. The dataset's folder and CSV are dated an hour back,
as for data unpacked long ago: a folder changed within the last seconds is checked in full every
time (its mtime may not have caught up with the last change), which is not what these tests are about.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from ich_tune.cli import main
from ich_tune.config.schema import DataConfig
from ich_tune.data.cache import ensure_cache, find_dicom_files, open_cache
from ich_tune.data.channels import parse_channels, to_channels
from ich_tune.data.dicom import read_hu
from ich_tune.data.rsna import LABELS_CSV, TRAIN_DIR
from ich_tune.data.synthetic import generate

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")


def age(root: Path) -> None:
    """Date the DICOM folder and the labels CSV an hour back."""
    past = time.time_ns() - 3600 * 10**9
    for path in (root / TRAIN_DIR, root / LABELS_CSV):
        os.utime(path, ns=(past, past))


@pytest.fixture
def dataset(tmp_path) -> Path:
    root = tmp_path / "rsna"
    generate(root, studies=2, slices=3, size=32, seed=11, positive_rate=0.4, quirk_rate=0.0)
    age(root)
    return root


def config(root: Path, cache_dir: Path) -> DataConfig:
    return DataConfig(root=str(root), cache_dir=str(cache_dir), full_size=32, workers=1)


class Calls:
    """Counts the file-system calls ensure_cache makes, passing each to the real function."""

    def __init__(self, monkeypatch) -> None:
        self.stats: list[str] = []
        self.listed: list[str] = []
        real_stat, real_scandir = os.stat, os.scandir

        def stat(path, *args, **kwargs):
            self.stats.append(str(path))
            return real_stat(path, *args, **kwargs)

        def scandir(path="."):
            self.listed.append(str(path))
            return real_scandir(path)

        monkeypatch.setattr(os, "stat", stat)
        monkeypatch.setattr(os, "scandir", scandir)

    def dicom_stats(self) -> list[str]:
        return [path for path in self.stats if path.endswith(".dcm")]


def test_unchanged_dataset_is_found_without_a_stat_per_file(dataset, tmp_path, monkeypatch):
    cfg = config(dataset, tmp_path / "cache")
    built = ensure_cache(cfg, dataset)
    files = find_dicom_files(dataset)
    calls = Calls(monkeypatch)
    assert ensure_cache(cfg, dataset) == built
    assert calls.dicom_stats() == [] and calls.listed == []  # the folder and the CSV, not their files

    calls.stats.clear()
    assert ensure_cache(cfg, dataset, rescan=True) == built  # the full check: every file
    assert sorted(calls.dicom_stats()) == sorted(str(path) for path in files.values())
    assert calls.listed == [str(dataset / TRAIN_DIR)]


def test_a_folder_changed_just_now_is_checked_in_full_each_time(dataset, tmp_path, monkeypatch):
    cfg = config(dataset, tmp_path / "cache")
    os.utime(dataset / TRAIN_DIR)  # changed now: a change in the same clock tick would not show
    built = ensure_cache(cfg, dataset)
    calls = Calls(monkeypatch)
    assert ensure_cache(cfg, dataset) == built
    assert len(calls.dicom_stats()) == len(find_dicom_files(dataset))


def added(root: Path, ids: list[str]) -> str:
    """A copy of a slice under a new name; the labels CSV is left as it was."""
    shutil.copy(root / TRAIN_DIR / f"{ids[0]}.dcm", root / TRAIN_DIR / "ID_0123456789.dcm")
    return "ID_0123456789"


def removed(root: Path, ids: list[str]) -> str:
    (root / TRAIN_DIR / f"{ids[1]}.dcm").unlink()
    return ids[1]


def renamed(root: Path, ids: list[str]) -> str:
    (root / TRAIN_DIR / f"{ids[2]}.dcm").rename(root / TRAIN_DIR / "ID_fedcba987.dcm")
    return ids[2]


def relabelled(root: Path, ids: list[str]) -> str:
    csv = root / LABELS_CSV
    text = csv.read_text()
    line = f"{ids[3]}_any,"
    value = text[text.index(line) + len(line)]
    csv.write_text(text.replace(line + value, line + ("1" if value == "0" else "0")))  # same size
    return ids[3]


@pytest.mark.parametrize("change", [added, removed, renamed, relabelled])
def test_the_cheap_check_sees_files_added_removed_renamed_and_a_changed_csv(dataset, tmp_path, change):
    cfg = config(dataset, tmp_path / "cache")
    old = open_cache(ensure_cache(cfg, dataset))
    ids = sorted(old.ids)
    image = change(dataset, ids)
    new = open_cache(ensure_cache(cfg, dataset))
    assert new.path != old.path
    if change is added:  # no label, so not in the cache; but in the full fingerprint
        assert new.manifest["fingerprint"]["files"] == old.manifest["fingerprint"]["files"] + 1
    elif change is relabelled:
        [row], [old_row] = np.flatnonzero(new.ids == image), np.flatnonzero(old.ids == image)
        assert new.labels[row, 5] != old.labels[old_row, 5]
    else:
        assert image not in set(new.ids) and new.manifest["skipped"] == {image: "no DICOM file"}


def test_rescan_finds_a_file_rewritten_in_place_that_the_cheap_check_misses(dataset, tmp_path):
    cfg = config(dataset, tmp_path / "cache")
    old = open_cache(ensure_cache(cfg, dataset))
    files = find_dicom_files(dataset)
    target, source = old.ids[0], old.ids[1]
    shutil.copyfile(files[source], files[target])  # same size and folder, other pixels
    assert ensure_cache(cfg, dataset) == old.path  # the cheap check cannot see it
    new = open_cache(ensure_cache(cfg, dataset, rescan=True))
    assert new.path != old.path
    expected = to_channels(read_hu(files[source]), parse_channels("hu"), 32)
    assert not np.array_equal(old.images[0], expected)
    np.testing.assert_array_equal(new.images[0], expected)
    assert ensure_cache(cfg, dataset) == new.path  # what the rescan found is remembered


def test_preprocess_rescan_flag(dataset, tmp_path, capsys):
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(yaml.safe_dump({"data": {"root": str(dataset), "cache_dir": str(tmp_path / "cache"),
                                                   "full_size": 32, "workers": 1}}))

    def preprocess(*flags: str) -> str:
        assert main(["preprocess", str(experiment), *flags]) == 0
        [line] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("cache: ")]
        return line

    first = preprocess()
    files = find_dicom_files(dataset)
    a, b = sorted(files)[:2]
    shutil.copyfile(files[b], files[a])  # in place: only the full check sees it
    assert preprocess("--rescan") != first
