"""Reading a DICOM folder for predict: one process against a pool of worker processes.

Both read the same synthetic 512x512 slices as `predict` does before its model sees them: every
header (to find the images and rebuild their series), then every slice decoded to HU, resized and
windowed into the channels of a half-resolution model. Rounds alternate the two so that a change
in the machine's load falls on both; each figure is the best of its rounds. The pool's start-up
is reported apart from its reading rate: it is paid once per run, whatever the folder's size. The
exit status is 1 when the pool's reading rate misses its target.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ich_tune.bench.data import synthetic_data, warm_page_cache
from ich_tune.errors import UserError

# ich_tune's data modules are imported inside the functions: the CLI imports every bench for its
# arguments, and at the top they would slow the start of every command.

TARGET_SPEEDUP = 1.7  # on 2 cores: the pool must win most of the second core
CHANNELS, SIZE = ["brain", "subdural", "bone"], 256  # halfres: 512 -> 256, three windows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work", type=Path, default=Path("runs/bench-predict"),
                        help="folder for the synthetic slices (written once, reused)")
    parser.add_argument("--images", type=int, default=800, help="synthetic 512x512 slices (at least)")
    parser.add_argument("--workers", type=int, help="pool processes, at least 2 (default: usable cores)")
    parser.add_argument("--rounds", type=int, default=2, help="times each way is measured, alternating")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")


def run(args: argparse.Namespace) -> int:
    workers = args.workers or len(os.sched_getaffinity(0))
    if workers < 2:
        raise UserError(f"bench predict: {workers} worker(s); it compares one process with a pool, which "
                        "needs --workers 2 or more (and as many usable cores for a fair figure).")
    root = synthetic_data(args.work / "rsna", args.images)
    files = warm_page_cache(root)
    folder = next(iter(files.values())).parent
    load_before, pressure_before = os.getloadavg()[0], cpu_pressure()
    runs: dict[int, list[Reading]] = {1: [], workers: []}
    for _ in range(args.rounds):
        for count, readings in runs.items():
            reading = read_folder(folder, count)
            readings.append(reading)
            pooled = f"{count} processes, after {reading.start_s:.1f} s of start-up"
            print(f"{pooled if count > 1 else 'one process'}: {reading.images} images in "
                  f"{reading.seconds:.1f} s, {reading.rate:,.0f} images/s, {reading.cores:.2f} cores busy, "
                  f"{1000 * reading.cpu_s / reading.images:.1f} ms CPU per image")
    single, pooled = (max(readings, key=lambda r: r.rate) for readings in runs.values())
    figures = {
        "images": len(files), "workers": workers, "single_images_per_s": single.rate,
        "pooled_images_per_s": pooled.rate, "speedup": pooled.rate / single.rate,
        "pool_start_s": runs[workers][0].start_s, "single_cores_busy": single.cores,
        "pooled_cores_busy": pooled.cores, "single_cpu_ms_per_image": 1000 * single.cpu_s / single.images,
        "pooled_cpu_ms_per_image": 1000 * pooled.cpu_s / pooled.images, "rounds": args.rounds,
        "cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
        "load_average": [load_before, os.getloadavg()[0]],
        "cpu_pressure_percent": [pressure_before, cpu_pressure()],
    }
    print(table(figures))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1))
    return 0 if figures["speedup"] >= TARGET_SPEEDUP else 1


@dataclass
class Reading:
    images: int  # decoded
    start_s: float  # starting the pool
    seconds: float  # reading, once started
    cpu_s: float  # CPU time of every process while reading

    @property
    def rate(self) -> float:
        return self.images / self.seconds

    @property
    def cores(self) -> float:
        """Cores the reading had on average: below the processes it ran, the machine was busy."""
        return self.cpu_s / self.seconds


def read_folder(folder: Path, workers: int) -> Reading:
    """Headers and pixels of every file read as predict reads them, timed."""
    from ich_tune.data.folder import decode, readers, scan

    started = time.perf_counter()
    with readers(workers) as run:
        list(run(abs, [0] * workers))  # every worker up
        ready, cpu = time.perf_counter(), cpu_seconds()
        found = scan(folder, run)
        decoded = sum(not isinstance(result, str)
                      for _, result in decode(found.images, CHANNELS, SIZE, run))
        return Reading(decoded, ready - started, time.perf_counter() - ready, cpu_seconds() - cpu)


def cpu_seconds() -> float:
    """CPU time of this process and its live children (the pool's workers), from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = time.process_time()
    for child in multiprocessing.active_children():
        fields = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def cpu_pressure() -> float | None:
    """Share of the last 10 s in which some runnable process waited for a CPU (Linux PSI), in %.

    Near 100 the cores are saturated by other work: a second process then buys little, whatever
    the code does, and the ratio below says more about the machine than about the pool.
    """
    try:
        return float(Path("/proc/pressure/cpu").read_text().split()[1].removeprefix("avg10="))
    except (OSError, IndexError, ValueError):
        return None


def table(f: dict) -> str:
    passed = "PASS" if f["speedup"] >= TARGET_SPEEDUP else "FAIL"
    ways = (("one process", "single"), (f"pool of {f['workers']} processes", "pooled"))
    return "\n".join([
        f"predict's reading: {f['images']:,} synthetic 512x512 slices -> 3 windows at {SIZE}x{SIZE}, "
        f"headers included; page cache warm; best of {f['rounds']} rounds",
        f"machine: {f['cpus']} CPUs ({f['usable_cpus']} usable), load average {f['load_average'][0]:.1f} "
        f"before, {f['load_average'][1]:.1f} after; CPU pressure {_percent(f['cpu_pressure_percent'][0])} "
        f"before, {_percent(f['cpu_pressure_percent'][1])} after (shared with other work)",
        "",
        f"{'':<40}{'images/s':>10}{'cores busy':>14}{'CPU ms/image':>16}",
        *(f"{name:<40}{f[way + '_images_per_s']:>10,.0f}{f[way + '_cores_busy']:>14.2f}"
          f"{f[way + '_cpu_ms_per_image']:>16.1f}" for name, way in ways),
        f"pool start-up, the forkserver's included (once per run): {f['pool_start_s']:.1f} s",
        "",
        f"pool vs one process: {f['speedup']:.2f}x (target >= {TARGET_SPEEDUP}x)  {passed}",
    ])


def _percent(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.0f}%"
