"""Compute per good model: the full grid against ASHA and other early-stopping searches on one space.

Each variant is a real search (`run_search`) of the same space, one after another on one Ray:

  grid           every trial to its budget, FIFO: the reference (its best and its total steps)
  asha           ASHA, trials in grid order (the default)
  asha-shuffled  ASHA, the grid in a shuffled order (`search_alg: shuffled`): in grid order the first
                 trials pass every rung only because they came first
  tpe-asha       Optuna TPE + ASHA, the grid's values as `choice`, as many trials
  median         Ray's median stopping rule, grid order

For each: training steps / the grid's, the best metric and its gap to the grid's best (with AUC(any)
and log loss at that validation), wall time and scheduling efficiency = busy trial-seconds /
(concurrency x wall). Busy time and wall time come from the trials' MLflow runs (first start to last
end), so Ray's start-up and the end-of-search logging stay outside them.

`--estimate SPACE` runs nothing: it prints the original's GPU-hours for SPACE (every trial to its
budget, one whole GPU each) beside ours (a measured step fraction, divided by the packing factor).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from ich_tune.bench.train import loop_step
from ich_tune.errors import UserError
from ich_tune.tracking import client as tracking
from ich_tune.trials import STOPPED_EARLY, best_of

VARIANTS = {  # name: (what it is, --set overrides); tpe-asha's markers are added per space
    "grid": ("full grid, FIFO (reference)", ["scheduler.name=fifo", "search_alg.name=grid"]),
    "asha": ("ASHA, grid order", ["scheduler.name=asha", "search_alg.name=grid"]),
    "asha-shuffled": ("ASHA, shuffled grid", ["scheduler.name=asha", "search_alg.name=shuffled"]),
    "tpe-asha": ("Optuna TPE + ASHA", ["scheduler.name=asha", "search_alg.name=optuna"]),
    "median": ("median stopping, grid order", ["scheduler.name=median", "search_alg.name=grid"]),
}
TARGET_GAP, TARGET_STEPS = 0.01, 0.33  # within 0.01 of the grid's best with at most 33% of its steps
# ASHA's share of the grid's steps when no --from-json is given: measured by `bench search` on the
# 9-trial demo (search_spaces/demo.yaml, 2 CPU cores)
DEFAULT_STEP_FRACTION = 0.49
ORIGINAL_TRIALS, ORIGINAL_STEPS = 60, 20000  # basic_hparams: 15 grid points x 4 samples, 20,000 steps


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--space", type=Path, default=Path("search_spaces/bench.yaml"))
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, from {', '.join(VARIANTS)}; grid always runs")
    parser.add_argument("--storage", type=Path, default=Path("runs/bench-search"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--estimate", type=Path, metavar="SPACE",
                        help="print what SPACE would cost, the original's way and ours; runs nothing")
    parser.add_argument("--step-time", type=float, metavar="S",
                        help="--estimate: seconds per training step on one GPU (default: measured here)")
    parser.add_argument("--from-json", type=Path,
                        help="--estimate: the --json of a previous bench search, for its step fraction")
    parser.add_argument("--variant", default="asha", help="--estimate: whose step fraction to take")
    parser.add_argument("--packing", type=float,
                        help="--estimate: throughput of one GPU shared by the search's trials / one trial's")
    parser.add_argument("--packing-json", type=Path, help="--estimate: the --json of bench packing")


def run(args: argparse.Namespace) -> int:
    if args.estimate:
        return estimate(args)
    names = ["grid", *(n for n in _names(args.variants) if n != "grid")]
    figures = compare(args, names)
    print_table(figures, names)
    log_to_mlflow(figures, names, args)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise UserError(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}.")
    return names


def variant_overrides(name: str, search) -> list[str]:
    """--set pairs that turn the bench space into variant `name`."""
    overrides = list(VARIANTS[name][1])
    if name == "tpe-asha":  # Optuna takes no grid: the same values as choices, as many trials
        overrides += [f"{d.path}={json.dumps({'choice': list(d.args)})}" for d in search.dimensions
                      if d.kind == "grid_search"]
        overrides.append(f"num_samples={search.num_trials}")
    return overrides


def compare(args: argparse.Namespace, names: list[str]) -> dict:
    """Run every variant; figures per variant, and the grid's as the reference."""
    # loaded when the bench runs, not when the CLI builds its parser (see ich_tune.bench)
    from ich_tune.experiment import load_search
    from ich_tune.search.driver import run_search
    from ich_tune.search.options import RunOptions

    # a bench variant is not a candidate model: registering it would add versions and could move champion
    base = [*args.overrides, f"storage={args.storage}", "registered_model=''"]
    reference = load_search(args.space, base)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    figures: dict = {"machine": f"{os.cpu_count()} CPU cores", "space": str(args.space),
                     "overrides": args.overrides, "metric": reference.config.metric,
                     "mode": reference.config.mode, "trials": reference.num_trials, "variants": {}}
    for name in names:
        search = load_search(args.space, [*base, *variant_overrides(name, reference)])
        print(f"\n== bench search: {name} ({VARIANTS[name][0]}), {search.num_trials} trials")
        started = time.perf_counter()
        outcome = run_search(search, RunOptions(name=f"{name}-{stamp}"))
        figures["variants"][name] = measure(outcome, search) | {"command_s": time.perf_counter() - started}
    grid = figures["variants"]["grid"]
    for f in figures["variants"].values():
        f["steps_ratio"] = f["steps"] / grid["steps"] if grid["steps"] else float("nan")
        f["gap"] = abs(f["best"] - grid["best"])
    return figures


def measure(outcome, search) -> dict:
    """Steps, the best trial's metrics at its best validation, busy and wall time, and the curve of
    best-so-far against steps spent (validations of all trials in the order they happened)."""
    # loaded when the bench runs, not when the CLI builds its parser (see ich_tune.bench)
    import ray
    from mlflow.tracking import MlflowClient

    config = search.config
    children = tracking.child_runs(MlflowClient(outcome.tracking_uri), outcome.parent_run_id)
    spans = [(c.info.start_time / 1000, c.info.end_time / 1000) for c in children if c.info.end_time]
    cpus = ray.cluster_resources().get("CPU", 1)
    concurrency = min(config.max_concurrent_trials or len(spans),
                      int(cpus // max(config.resources.cpu, 1e-9)), len(spans))
    # no ended trial run, or no trial fitting the cluster: NaN figures rather than a crash after the search
    wall = max(end for _, end in spans) - min(start for start, _ in spans) if spans else float("nan")
    busy = sum(end - start for start, end in spans)
    efficiency = busy / (concurrency * wall) if concurrency and wall else float("nan")
    best = best_of(outcome.trials, config.mode)
    at_best = next((row for row in best.history if row.get(config.metric) == best.best), {}) if best else {}
    events = sorted(((row.get("timestamp", 0), row.get("time_total_s", 0), t.trial_id, row)
                     for t in outcome.trials for row in t.history), key=lambda e: e[:2])
    reached: dict[str, int] = {}
    steps, values = [], []
    for _, _, trial, row in events:
        reached[trial] = int(row.get("step", 0))
        steps.append(sum(reached.values()))
        values.append(float(row.get(config.metric, float("nan"))))
    return {
        "trials": len(outcome.trials), "steps": sum(t.steps for t in outcome.trials),
        "stopped_early": sum(t.status == STOPPED_EARLY for t in outcome.trials),
        "best": best.best if best else float("nan"),
        "best_params": best.params if best else {}, "trial_params": [t.params for t in outcome.trials],
        "best_auc_any": float(at_best.get("val_auc_any", float("nan"))),
        "best_log_loss": float(at_best.get("val_log_loss", float("nan"))),
        "wall_s": wall, "busy_s": busy, "concurrency": concurrency,
        "efficiency": efficiency, "curve": {"steps": steps, "values": values},
    }


def verdict(figures: dict, names: list[str]) -> tuple[str, bool]:
    """The pass/fail line: the cheapest variant within TARGET_GAP of the grid's best."""
    close = [n for n in names if n != "grid" and figures["variants"][n]["gap"] <= TARGET_GAP]
    if not close:
        return f"no variant within {TARGET_GAP} of the grid's best {figures['metric']}", False
    name = min(close, key=lambda n: figures["variants"][n]["steps_ratio"])
    f = figures["variants"][name]
    return (f"{name}: within {f['gap']:.4f} of the grid's best with {f['steps_ratio']:.0%} of its steps "
            f"(target: <= {TARGET_GAP} with <= {TARGET_STEPS:.0%})"), f["steps_ratio"] <= TARGET_STEPS


def print_table(figures: dict, names: list[str]) -> None:
    metric = figures["metric"]
    print(f"\nbench search: {figures['space']} ({figures['trials']} trials), {figures['machine']}")
    print(f"{'variant':14} {'trials':>6} {'stopped':>7} {'steps':>7} {'/grid':>6} {'best ' + metric:>17} "
          f"{'gap':>7} {'AUC any':>7} {'logloss':>7} {'wall s':>7} {'busy s':>7} {'slots':>5} {'effic.':>6}")
    for name in names:
        f = figures["variants"][name]
        print(f"{name:14} {f['trials']:>6} {f['stopped_early']:>7} {f['steps']:>7} {f['steps_ratio']:>6.2f} "
              f"{f['best']:>17.4f} {f['gap']:>7.4f} {f['best_auc_any']:>7.3f} {f['best_log_loss']:>7.3f} "
              f"{f['wall_s']:>7.0f} {f['busy_s']:>7.0f} {f['concurrency']:>5} {f['efficiency']:>6.3f}")
    text, ok = verdict(figures, names)
    print(f"  {'PASS' if ok else 'FAIL'}  {text}")


def log_to_mlflow(figures: dict, names: list[str], args: argparse.Namespace) -> None:
    """A run in MLflow experiment 'bench-search' with every figure and the best-so-far plot (also
    written beside the search runs on disk)."""
    # loaded when the bench runs, not when the CLI builds its parser (see ich_tune.bench)
    from mlflow.tracking import MlflowClient

    from ich_tune.evaluation import plots

    storage = args.storage.resolve()
    uri = tracking.default_tracking_uri(storage)
    client = MlflowClient(uri)
    exp_id = tracking.experiment_id(client, "bench-search", storage / "mlartifacts")
    run = client.create_run(exp_id, run_name=time.strftime("%Y%m%d-%H%M%S"))
    client.log_param(run.info.run_id, "space", figures["space"])
    for name in names:
        f = figures["variants"][name]
        for key in ("steps", "steps_ratio", "best", "gap", "best_auc_any", "best_log_loss", "wall_s",
                    "efficiency"):
            client.log_metric(run.info.run_id, f"{name}.{key}", f[key])
    curves = {n: (figures["variants"][n]["curve"]["steps"], figures["variants"][n]["curve"]["values"])
              for n in names}
    png = plots.save_png(plots.best_so_far(curves, figures["metric"], figures["mode"],
                                           figures["variants"]["grid"]["best"]),
                         storage / f"best-so-far-{run.info.run_name}.png")
    client.log_artifact(run.info.run_id, str(png))
    client.log_text(run.info.run_id, json.dumps(figures, indent=1), "figures.json")
    client.set_terminated(run.info.run_id)
    print(f"plot: {png}\nMLflow: run {run.info.run_id} in experiment 'bench-search' ({uri})")


def estimate(args: argparse.Namespace) -> int:
    """The original's cost of a search beside ours, before running it."""
    # loaded when the bench runs, not when the CLI builds its parser (see ich_tune.bench)
    from ich_tune.experiment import load_search

    for flag, value in (("--step-time", args.step_time), ("--packing", args.packing)):
        if value is not None and not value > 0:
            raise UserError(f"{flag} {value:g}: must be a positive number.")
    search = load_search(args.estimate, args.overrides)
    budget = search.trial_experiment(search.first_values).train.max_steps
    trials = search.num_trials
    if args.step_time is not None:
        step_time, where, unit = args.step_time, "given with --step-time", "GPU-hours"
    else:
        step_time, where, unit = measure_step_time(search)
    fraction, source = step_fraction(args)
    packing, packed = packing_factor(args, search.config.resources.gpu)
    original = trials * budget * step_time / 3600
    ours = original * fraction / packing
    print(f"estimate: {args.estimate}: {trials} trials x {budget:,} steps")
    print(f"  step time      {step_time:.4f} s per step ({where})")
    print(f"  step fraction  {fraction:.2f} of the grid's steps ({source})")
    print(f"  packing        x{packing:.2f} throughput per GPU ({packed})")
    print(f"  original: every trial to its budget, one whole GPU each: {original:,.1f} {unit}")
    print(f"  ours:     early stopping and shared GPUs:            {ours:,.1f} {unit} "
          f"({ours / original:.0%} of the original)")
    if (trials, budget) != (ORIGINAL_TRIALS, ORIGINAL_STEPS):
        print(f"  (the original searched {ORIGINAL_TRIALS} trials x {ORIGINAL_STEPS:,} steps)")
    return 0


def step_fraction(args: argparse.Namespace) -> tuple[float, str]:
    if not args.from_json:
        return DEFAULT_STEP_FRACTION, ("default: ASHA on the 9-trial demo, measured by bench search on "
                                       "2 CPU cores; pass --from-json for another")
    figures = _read_json(args.from_json)
    variants = figures.get("variants", {})
    if args.variant not in variants:
        raise UserError(f"{args.from_json}: no variant '{args.variant}' in it (it has "
                        f"{', '.join(variants) or 'none'}); pass --variant.")
    return float(variants[args.variant]["steps_ratio"]), f"{args.variant} in {args.from_json}"


def packing_factor(args: argparse.Namespace, gpu: float) -> tuple[float, str]:
    """Aggregate throughput of one GPU shared by 1/gpu trials over one trial alone."""
    if args.packing is not None:
        return args.packing, "given with --packing"
    if not args.packing_json:
        return 1.0, "none assumed; pass --packing or --packing-json from bench packing"
    rows = [r for r in _read_json(args.packing_json).get("rows", []) if not r.get("oom")]
    alone = next((r for r in rows if r["trials"] == 1), None)
    shared = next((r for r in rows if abs(r["gpu"] - gpu) < 1e-6), None)
    if not alone or not shared:
        raise UserError(f"{args.packing_json}: no rows for 1 trial and for resources.gpu {gpu:g}; run "
                        f"bench packing with --counts 1,{round(1 / gpu) if gpu else 1}.")
    return shared["samples_per_s"] / alone["samples_per_s"], f"{shared['trials']} trials at gpu {gpu:g}, " \
                                                            f"from {args.packing_json}"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read it as JSON ({err}).") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object from a bench --json.")
    return data


def measure_step_time(search, steps: int = 10, budget_s: float = 20.0) -> tuple[float, str, str]:
    """Seconds per training step of the search's first trial on random input of its shape: the bare
    loop of `bench train` (the loop's optimizer step), without its data. After one warm-up
    step, `steps` steps or as many as fit in `budget_s` (a halfres step takes half a minute on a CPU)."""
    # loaded when the bench runs, not when the CLI builds its parser (see ich_tune.bench)
    import torch

    from ich_tune.data.neighbours import input_channels

    config = search.trial_experiment(search.first_values)
    placement, train_step = loop_step(config)
    size, batch = config.data.size, config.train.batch_size
    images = placement.images(torch.rand(batch, input_channels(config.data), size, size))

    def step() -> None:
        train_step(images).item()  # waits for the GPU

    step()
    start, done = time.perf_counter(), 0
    while done < steps and (done == 0 or time.perf_counter() - start < budget_s):
        step()
        done += 1
    seconds = (time.perf_counter() - start) / done
    if placement.device.type == "cuda":
        where = f"measured here on {torch.cuda.get_device_name()}, input {size}x{size}, batch {batch}"
        return seconds, where, "GPU-hours"
    where = (f"measured here on the CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads), input "
             f"{size}x{size}, batch {batch}: a CPU figure, far slower than a GPU's; pass --step-time for "
             "a GPU's")
    return seconds, where, "CPU-hours (no GPU here)"
