"""Data loading: per-sample DICOM decoding (the original's way) against the preprocessed cache.

Three figures on the same synthetic 512x512 slices, brought to 256x256 raw HU: (a) the original's
loading, each sample read with pydicom, converted to HU and downsampled in the training process;
(b) building the cache from scratch with every core; (c) batches from the built cache. The cache
pays off when (c) is far above (a), and its one-off build is cheaper than a single pass of (a).
The exit status is 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

# ich_tune's data modules, numpy and torch are imported inside the functions: the CLI imports every
# bench for its arguments, and at the top they would slow the start of every command.

if TYPE_CHECKING:
    from ich_tune.config.schema import DataConfig

SLICES_PER_STUDY = 40  # RSNA: about 874,000 images from 25,000 exams
FULL_SIZE, LOD = 512, 1  # halfres.yaml: 512 -> 256
TARGET_RATIO, TARGET_RATE = 20.0, 10_000.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work", type=Path, default=Path("runs/bench-data"),
                        help="folder for the synthetic data (reused) and the cache (rebuilt every run)")
    parser.add_argument("--images", type=int, default=2000, help="synthetic 512x512 slices (at least)")
    parser.add_argument("--batch-size", type=int, default=12, help="batch size (halfres.yaml: 12)")
    parser.add_argument("--baseline-samples", type=int, default=480,
                        help="samples timed for the per-sample baseline")
    parser.add_argument("--batches", type=int, default=3000, help="batches timed from the cache")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")


def run(args: argparse.Namespace) -> int:
    import torch

    from ich_tune.config.schema import DataConfig

    load_before = os.getloadavg()[0]
    root = synthetic_data(args.work / "rsna", args.images)
    cfg = DataConfig(root=str(root), cache_dir=str(args.work / "cache"), full_size=FULL_SIZE, lod=LOD,
                     channels="hu", max_images=args.images)
    files = warm_page_cache(root)
    baseline = per_sample_rate(root, files, cfg, args.batch_size, args.baseline_samples)
    build, cache_path = cache_build_rate(cfg, root)
    (cached, cached_float, cached_float_1), nbytes = cached_rate(cache_path, args.batch_size, args.batches)
    shutil.rmtree(args.work / "cache")
    figures = {
        "images": args.images, "size": cfg.size, "batch_size": args.batch_size,
        "baseline_samples_per_s": baseline, "build_samples_per_s": build,
        "cached_samples_per_s": cached, "cached_float_samples_per_s": cached_float,
        "cached_float_1_thread_samples_per_s": cached_float_1,
        "cached_vs_baseline": cached / baseline, "build_vs_baseline": build / baseline,
        "cache_bytes_per_1000_images": nbytes * 1000 / args.images,
        "cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(), "load_average": [load_before, os.getloadavg()[0]],
    }
    print(table(figures))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1))
    passed = (cached >= TARGET_RATIO * baseline and cached >= TARGET_RATE and build > baseline)
    return 0 if passed else 1


def synthetic_data(root: Path, images: int) -> Path:
    """At least `images` train slices at 512x512, generated once and reused while the plan holds."""
    from ich_tune.data.rsna import LABELS_CSV
    from ich_tune.data.synthetic import generate

    plan = {"studies": math.ceil(images / SLICES_PER_STUDY), "slices": SLICES_PER_STUDY,
            "size": FULL_SIZE, "seed": 0, "quirk_rate": 0.01, "test_studies": 0}
    marker = root / "bench-plan.json"
    if (root / LABELS_CSV).is_file() and marker.is_file() and json.loads(marker.read_text()) == plan:
        print(f"data: reusing {plan['studies'] * SLICES_PER_STUDY} synthetic slices in {root}")
        return root
    print(f"data: writing {plan['studies']} studies x {SLICES_PER_STUDY} synthetic 512x512 slices "
          f"to {root}")
    marker.unlink(missing_ok=True)
    generate(root, **plan)
    marker.write_text(json.dumps(plan))
    return root


def warm_page_cache(root: Path) -> dict[str, Path]:
    """Read every file once, so that (a) and (b) both measure decoding rather than the disk."""
    from ich_tune.data.cache import find_dicom_files

    files = find_dicom_files(root)
    total = sum(len(path.read_bytes()) for path in files.values())
    print(f"data: {len(files)} files, {total / 2**20:,.0f} MiB read once to warm the page cache")
    return files


def per_sample_rate(root: Path, files: dict[str, Path], cfg: DataConfig, batch_size: int,
                    samples: int) -> float:
    """(a) samples/s: read, HU, downsample one file at a time and stack batches, in this process."""
    import numpy as np
    import torch

    from ich_tune.data.channels import parse_channels, to_channels
    from ich_tune.data.dicom import DicomError, read_hu
    from ich_tune.data.labels import read_labels
    from ich_tune.data.rsna import LABELS_CSV

    labels = read_labels(root / LABELS_CSV)
    row = {image: k for k, image in enumerate(labels.ids)}
    order = np.random.default_rng(0).permutation(sorted(files))
    channels = parse_channels(cfg.channels)
    done, skipped, started = 0, 0, time.perf_counter()
    for start in range(0, samples, batch_size):
        images, targets = [], []
        for image in order[start:start + batch_size]:
            try:
                images.append(to_channels(read_hu(files[image]), channels, cfg.size))
            except DicomError:  # the one corrupt file; a real loader would have to skip it too
                skipped += 1
                continue
            targets.append(labels.y[row[image]])
        batch = torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(targets).astype(np.float32))
        done += len(batch[0])
    rate = done / (time.perf_counter() - started)
    print(f"(a) baseline: {done} samples in batches of {batch_size}, {rate:,.0f}/s"
          + (f" ({skipped} undecodable skipped)" if skipped else ""))
    return rate


def cache_build_rate(cfg: DataConfig, root: Path) -> tuple[float, Path]:
    """(b) samples/s of a build from scratch with a process per core, and the cache it made."""
    from ich_tune.data.cache import ensure_cache

    shutil.rmtree(cfg.cache_dir, ignore_errors=True)
    started = time.perf_counter()
    path = ensure_cache(cfg, root)
    seconds = time.perf_counter() - started
    rate = cfg.max_images / seconds
    print(f"(b) cache build: {cfg.max_images} images in {seconds:.1f} s, {rate:,.0f}/s")
    return rate, path


def cached_rate(path: Path, batch_size: int, batches: int) -> tuple[list[float], int]:
    """(c) samples/s of TrainBatches over the cache: as stored (float16), then after to_float with
    torch's default threads and with one (on busy cores its thread pool can cost more than it saves)."""
    from itertools import islice

    import numpy as np
    import torch

    from ich_tune.data.cache import open_cache
    from ich_tune.data.loader import TrainBatches, to_float

    cache = open_cache(path)
    stream = iter(TrainBatches(cache, np.flatnonzero(cache.valid), batch_size, seed=0))
    for _ in islice(stream, 200):  # warm-up: page in the array, settle the allocator
        pass
    threads = torch.get_num_threads()
    rates = []
    for convert_threads in (None, threads, 1):
        torch.set_num_threads(convert_threads or threads)
        started = time.perf_counter()
        for images, _ in islice(stream, batches):
            if convert_threads:
                to_float(images)
        rates.append(batches * batch_size / (time.perf_counter() - started))
    torch.set_num_threads(threads)
    print(f"(c) cached loader: {batches} batches, {rates[0]:,.0f}/s as {cache.images.dtype}, "
          f"{rates[1]:,.0f}/s with to_float ({threads} threads), {rates[2]:,.0f}/s (1 thread)")
    return rates, cache.manifest["bytes"]


def table(f: dict) -> str:
    """The figures, their ratios and the targets, as printed at the end of the run."""
    base = f["baseline_samples_per_s"]
    rows = [
        ("(a) baseline: pydicom + HU + resize per sample, 1 process", base),
        (f"(b) cache build from scratch, {f['usable_cpus']} processes", f["build_samples_per_s"]),
        ("(c) cached loader (TrainBatches), float16 batches", f["cached_samples_per_s"]),
        (f"    ... + to_float (float32), {f['torch_threads']} torch threads",
         f["cached_float_samples_per_s"]),
        ("    ... + to_float (float32), 1 torch thread", f["cached_float_1_thread_samples_per_s"]),
    ]
    targets = [
        (f"cached loading >= {TARGET_RATIO:g}x baseline", f"{f['cached_vs_baseline']:.1f}x",
         f["cached_vs_baseline"] >= TARGET_RATIO),
        (f"cached loading >= {TARGET_RATE:,.0f} samples/s", f"{f['cached_samples_per_s']:,.0f}",
         f["cached_samples_per_s"] >= TARGET_RATE),
        ("cache build with all cores faster than (a), one process", f"{f['build_vs_baseline']:.1f}x",
         f["build_vs_baseline"] > 1),
    ]
    return "\n".join([
        f"data loading: {f['images']:,} synthetic 512x512 slices -> {f['size']}x{f['size']} HU, "
        f"batch {f['batch_size']}; page cache warm",
        f"machine: {f['cpus']} CPUs ({f['usable_cpus']} usable), torch threads {f['torch_threads']}, "
        f"load average {f['load_average'][0]:.1f} before, {f['load_average'][1]:.1f} after (shared)",
        "",
        f"{'':<58}{'samples/s':>12}{'vs (a)':>9}",
        *(f"{name:<58}{rate:>12,.0f}{rate / base:>8.1f}x" for name, rate in rows),
        "(a) is also the single-process rate of the build's per-image work; (b) includes",
        "    starting the worker processes",
        "",
        "targets",
        *(f"  {name:<56}{value:>12}  {'PASS' if ok else 'FAIL'}" for name, value, ok in targets),
        "",
        f"cache size: {f['cache_bytes_per_1000_images'] / 1e6:,.1f} MB per 1,000 images",
    ])
