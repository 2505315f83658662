"""Start-up at RSNA scale: what `run` and `train` do before the first step when the cache exists.

Trees of N tiny real DICOM files (8x8 pixels, one flat folder of ID_<hex>.dcm and stage_2_train.csv
with six rows per image, 40 slices per study) are written once under --work and their caches built
once; then each size is timed in fresh processes: finding the cache (the fingerprint of the data),
opening it and splitting it by patient, and building the training loader. Each size is timed with
the cheap fingerprint (the folder and the CSV only) and with --rescan (every file stat'ed, the
full check). "first" is the first start of a fresh process after the cache's files and the CSV were
dropped from the page cache (the folder's inodes may stay cached: cold-ish); "warm" is the best of
the repeats after it. A line through the sizes gives the figure at RSNA's 752,807 slices; the exit
status is 1 when the cheap warm start-up extrapolates past --target seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from ich_tune.files import atomic

# ich_tune's data modules and pydicom are imported inside the functions: the CLI imports every bench
# for its arguments, and at the top they would slow the start of every command.

RSNA_SLICES = 752_807
SLICES_PER_STUDY = 40
PHASES = ("cache", "splits", "loader")  # prepare_cache, load_splits, TrainBatches
PLACEHOLDERS = {  # unique values in the template file, replaced per file (same length: still valid DICOM)
    "image": "ID_aaaaaaaaa", "patient": "ID_bbbbbbbbbb", "study": "ID_cccccccccc",
    "series": "ID_dddddddddd", "z": "-1234.5",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work", type=Path, default=Path("runs/bench-startup"),
                        help="folder for the trees and their caches (reused when present)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[25_000, 50_000, 100_000],
                        help="slices per tree")
    parser.add_argument("--repeats", type=int, default=3, help="start-ups timed per size and mode")
    parser.add_argument("--target", type=float, default=10.0,
                        help="seconds the cheap warm start-up may take at 752,807 slices")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")


def run(args: argparse.Namespace) -> int:
    rows = []
    load_before = os.getloadavg()[0]
    for count in args.sizes:
        root, cache_dir = args.work / f"rsna-{count}", args.work / "cache"
        print(f"{count:,} slices: {root} (written and preprocessed once, then reused)", flush=True)
        written = write_tree(root, count)
        built = build_cache(root, cache_dir)
        for rescan in (False, True):
            times = [start_up(root, cache_dir, rescan, cold=k == 0) for k in range(args.repeats)]
            warm = min(times[1:], key=lambda t: sum(t.values())) if len(times) > 1 else times[0]
            rows.append({"slices": count, "mode": "--rescan" if rescan else "cheap", "first": times[0],
                         "warm": warm, "tree_s": written, "build_s": built})
    print(f"\nstart-up before the first step, cache built; seconds ({os.cpu_count()} CPU cores, load "
          f"average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after)")
    print(f"{'slices':>8} {'fingerprint':<11} {'first':>7} {'warm':>7}   warm by phase")
    for row in rows:
        phases = "  ".join(f"{p} {row['warm'][p]:.3f}" for p in PHASES)
        print(f"{row['slices']:>8,} {row['mode']:<11} {sum(row['first'].values()):>7.3f} "
              f"{sum(row['warm'].values()):>7.3f}   {phases}")
    figures = {"rows": rows, "at_rsna": {}, "cpus": os.cpu_count(), "load_before": load_before}
    for mode in ("cheap", "--rescan"):
        own = [r for r in rows if r["mode"] == mode]
        for kind in ("first", "warm"):
            figures["at_rsna"][f"{mode} {kind}"] = extrapolate(
                [r["slices"] for r in own], [sum(r[kind].values()) for r in own])
    print(f"linear extrapolation to {RSNA_SLICES:,} slices: "
          + ", ".join(f"{k} {v:.2f} s" for k, v in figures["at_rsna"].items()))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    slow = figures["at_rsna"]["cheap warm"] > args.target
    if slow:
        print(f"MISSED: the cheap warm start-up would take more than {args.target:g} s at RSNA scale")
    return 1 if slow else 0


def extrapolate(sizes: list[int], seconds: list[float]) -> float:
    """Seconds at RSNA's size from a least-squares line through (size, seconds)."""
    if len(sizes) == 1:
        return seconds[0] * RSNA_SLICES / sizes[0]
    slope, intercept = np.polyfit(sizes, seconds, 1)
    return float(slope * RSNA_SLICES + intercept)


def write_tree(root: Path, count: int, seed: int = 0) -> float:
    """RSNA's layout with `count` 8x8 slices; seconds taken (0 when the tree was already there)."""
    from ich_tune.data.labels import write_labels
    from ich_tune.data.rsna import LABELS_CSV, TRAIN_DIR

    if (root / LABELS_CSV).is_file():
        return 0.0
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    studies = -(-count // SLICES_PER_STUDY)
    ids = _hex_ids(rng, count, 9)
    study_ids = _hex_ids(rng, 2 * studies, 10)
    template = _template()
    folder = root / TRAIN_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(ids):
        study = k // SLICES_PER_STUDY
        values = {"image": image, "patient": f"ID_{study:010x}", "study": study_ids[2 * study],
                  "series": study_ids[2 * study + 1], "z": f"{k % SLICES_PER_STUDY * 5 - 60:7.1f}"}
        data = template
        for name, value in values.items():
            data = data.replace(PLACEHOLDERS[name].encode(), value.encode())
        (folder / f"{image}.dcm").write_bytes(data)
    any_bleed = rng.random(count) < 0.144
    y = np.zeros((count, 6), np.uint8)
    y[any_bleed, rng.integers(0, 5, int(any_bleed.sum()))] = 1
    y[:, 5] = any_bleed
    order = np.argsort(ids)
    with atomic(root / LABELS_CSV) as partial:  # present only when complete
        write_labels(partial, [ids[i] for i in order], y[order])
    return time.perf_counter() - started


def _hex_ids(rng: np.random.Generator, count: int, digits: int) -> list[str]:
    values = np.unique(rng.integers(0, 16**digits, count + count // 10 + 16))
    return [f"ID_{v:0{digits}x}" for v in rng.permutation(values)[:count]]


def _template() -> bytes:
    """One 8x8 CT slice written by pydicom, with each placeholder present exactly where it belongs."""
    import io

    from pydicom import config
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    def uid(tag: int, value: str) -> DataElement:
        return DataElement(tag, "UI", value, validation_mode=config.IGNORE)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.add(uid(0x00020003, PLACEHOLDERS["image"]))
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.add(uid(0x00080018, PLACEHOLDERS["image"]))
    ds.Modality = "CT"
    ds.PatientID = PLACEHOLDERS["patient"]
    ds.add(uid(0x0020000D, PLACEHOLDERS["study"]))
    ds.add(uid(0x0020000E, PLACEHOLDERS["series"]))
    ds.ImagePositionPatient = ["-70", "-70", PLACEHOLDERS["z"]]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
    ds.PixelData = np.arange(1000, 1064, dtype=np.uint16).tobytes()
    out = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Invalid value for VR UI", UserWarning)
        ds.save_as(out, enforce_file_format=True)
    data = out.getvalue()
    counts = {name: data.count(value.encode()) for name, value in PLACEHOLDERS.items()}
    assert counts == {"image": 2, "patient": 1, "study": 1, "series": 1, "z": 1}, counts
    return data


def _config(root: Path, cache_dir: Path):
    from ich_tune.config.schema import DataConfig

    return DataConfig(root=str(root), cache_dir=str(cache_dir), full_size=8, channels="hu")


def build_cache(root: Path, cache_dir: Path) -> float:
    """Seconds to build (or find) the tree's cache, in this process."""
    from ich_tune.data.cache import RACY_NS
    from ich_tune.data.prepare import prepare_cache
    from ich_tune.data.rsna import LABELS_CSV, TRAIN_DIR

    cfg = _config(root, cache_dir)
    started = time.perf_counter()
    prepare_cache(cfg)
    seconds = time.perf_counter() - started
    newest = max((root / TRAIN_DIR).stat().st_mtime_ns, (root / LABELS_CSV).stat().st_mtime_ns)
    time.sleep(max(0.0, (newest + RACY_NS - time.time_ns()) / 1e9))
    prepare_cache(cfg)  # as any later start: remembers the fingerprint of a folder not just written
    return seconds


def start_up(root: Path, cache_dir: Path, rescan: bool, cold: bool) -> dict[str, float]:
    """Seconds per phase of one start-up, in a fresh process; `cold` drops the cache files and the CSV
    from the page cache first."""
    code = ("import sys, json; from pathlib import Path; from ich_tune.bench.startup import time_phases; "
            "print(json.dumps(time_phases(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == '1', "
            "sys.argv[4] == '1')))")
    done = subprocess.run([sys.executable, "-c", code, str(root), str(cache_dir), str(int(rescan)),
                           str(int(cold))], capture_output=True, text=True)
    if done.returncode:  # the child's own error, which capture_output would otherwise swallow
        tail = "\n".join(done.stderr.strip().splitlines()[-10:])
        raise RuntimeError(f"a timed start-up of {root} failed (exit status {done.returncode}):\n{tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def time_phases(root: Path, cache_dir: Path, rescan: bool, cold: bool) -> dict[str, float]:
    """What train/run do before their first step, phase by phase (imports are done first)."""
    from ich_tune.data.loader import TrainBatches
    from ich_tune.data.prepare import load_splits, prepare_cache
    from ich_tune.data.rsna import LABELS_CSV

    cfg = _config(root, cache_dir)
    if cold:
        for path in [root / LABELS_CSV, *(p for p in cache_dir.rglob("*") if p.is_file())]:
            _drop_from_page_cache(path)
    started = time.perf_counter()
    path = prepare_cache(cfg, rescan=rescan)
    cached = time.perf_counter()
    splits = load_splits(path, cfg)
    split = time.perf_counter()
    TrainBatches(splits.cache, splits.train, batch_size=12, seed=0)
    return {"cache": cached - started, "splits": split - cached, "loader": time.perf_counter() - split}


def _drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
