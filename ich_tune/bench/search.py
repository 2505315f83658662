"""Scheduling efficiency of the demo search, and ASHA against the full grid on the same space.

(a) efficiency = trial busy time / (concurrency x wall time), wall time counted from the first trial's
start (so Ray's own start-up is outside it), busy time from each trial's MLflow run start to end.
(b) the same space run twice on one Ray: with ASHA, and with every trial run to the end (FIFO):
training steps spent and the best metric found by each.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--space", type=Path, default=Path("search_spaces/demo.yaml"))
    parser.add_argument("--storage", type=Path, default=Path("runs/bench-search"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", type=Path, help="also write the figures here")


def run(args: argparse.Namespace) -> int:
    import ray
    from mlflow.tracking import MlflowClient

    from ich_tune.config import load_search
    from ich_tune.search import RunOptions, run_search
    from ich_tune.tracking import child_runs
    from ich_tune.trials import STOPPED_EARLY, best_of

    stamp = time.strftime("%Y%m%d-%H%M%S")
    figures: dict = {"machine": f"{os.cpu_count()} CPU cores", "space": str(args.space)}
    for label, scheduler in (("asha", "asha"), ("grid", "fifo")):
        search = load_search(args.space, [*args.overrides, f"storage={args.storage}",
                                          f"scheduler.name={scheduler}"])
        started = time.perf_counter()
        outcome = run_search(search, RunOptions(name=f"{label}-{stamp}"))
        children = child_runs(MlflowClient(outcome.tracking_uri), outcome.parent_run_id)
        spans = [(c.info.start_time / 1000, c.info.end_time / 1000) for c in children]
        cpus = ray.cluster_resources().get("CPU", 1)
        concurrency = min(search.config.max_concurrent_trials or len(spans),
                          int(cpus // search.config.resources.cpu), len(spans))
        wall = max(end for _, end in spans) - min(start for start, _ in spans)
        busy = sum(end - start for start, end in spans)
        figures[label] = {
            "trials": len(outcome.trials), "steps": sum(t.steps for t in outcome.trials),
            "stopped_early": sum(t.status == STOPPED_EARLY for t in outcome.trials),
            "best": best.best if (best := best_of(outcome.trials, search.config.mode)) else float("nan"),
            "metric": search.config.metric, "wall_s": wall, "busy_s": busy, "concurrency": concurrency,
            "efficiency": busy / (concurrency * wall), "command_s": time.perf_counter() - started,
        }
    asha, grid = figures["asha"], figures["grid"]
    figures["steps_ratio"] = asha["steps"] / grid["steps"]
    figures["best_gap"] = abs(asha["best"] - grid["best"])
    print(f"\nbench search: {args.space}, {figures['machine']}")
    print(f"{'':6} {'trials':>6} {'stopped':>7} {'steps':>7} {'best ' + asha['metric']:>18} "
          f"{'wall s':>7} {'busy s':>7} {'slots':>5} {'efficiency':>10}")
    for label in ("asha", "grid"):
        f = figures[label]
        print(f"{label:6} {f['trials']:>6} {f['stopped_early']:>7} {f['steps']:>7} {f['best']:>18.4f} "
              f"{f['wall_s']:>7.0f} {f['busy_s']:>7.0f} {f['concurrency']:>5} {f['efficiency']:>10.3f}")
    checks = [
        ("scheduling efficiency of the demo search (asha) >= 0.85", asha["efficiency"] >= 0.85),
        (f"ASHA steps / grid steps = {figures['steps_ratio']:.2f} <= 0.40", figures["steps_ratio"] <= 0.40),
        (f"|ASHA best - grid best| = {figures['best_gap']:.4f} <= 0.01", figures["best_gap"] <= 0.01),
    ]
    for text, ok in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {text}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0
