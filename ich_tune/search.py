"""Builds and runs the Tuner: fractional GPUs, ASHA on training steps, grid or Optuna, resume.

The trial function is the plain training loop with Ray Tune's `report` plugged in. The driver
prepares the data once before any trial starts, and alone talks to MLflow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import ray
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from ich_tune.config import Search, build_experiment
from ich_tune.config.markers import to_param_space
from ich_tune.config.schema import DataConfig, ExperimentConfig, SearchConfig
from ich_tune.data.prepare import prepare_cache
from ich_tune.errors import UserError
from ich_tune.train import CHECKPOINT_FILE, LossNotFinite, train

DASHBOARD_PORT = 8265


@dataclass
class RunOptions:
    data_root: Path | None = None
    address: str | None = None  # join an existing Ray cluster instead of starting one
    resume: bool = False
    tracking_uri: str | None = None
    name: str | None = None  # the run folder under <storage>/<search name>/; default a timestamp
    num_gpus: int | None = None  # logical GPUs declared when starting a local Ray


@dataclass
class TrialSettings:
    """What every trial needs besides its config; shipped once through Ray's object store."""

    data: DataConfig  # the data the driver prepared
    cache_path: Path
    randomize_seed: bool
    threads: int
    gpu_fraction: float


class PruningOptunaSearch(OptunaSearch):
    """Optuna hears of trials that ASHA stopped before their budget as pruned, not complete."""

    def __init__(self, *args, budget: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.budget = budget

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        from optuna.trial import TrialState

        if result and not error and result.get("step", self.budget) < self.budget \
                and trial_id not in self._completed_trials:
            self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result, error)


def run_trial(config: dict, settings: TrialSettings) -> None:
    """One trial: the training loop, reporting each validation and checkpoint to Ray Tune."""
    import torch

    cfg = build_experiment(config, {})
    context = tune.get_context()
    trial_dir = Path(context.get_trial_dir())
    if settings.randomize_seed:  # stable across retries of the same trial
        cfg.seed = zlib.crc32(context.get_trial_id().encode())
    if torch.cuda.is_available() and 0 < settings.gpu_fraction < 1:
        cfg.train.cuda_memory_fraction = cfg.train.cuda_memory_fraction or settings.gpu_fraction
    prepared = cfg.data == settings.data and (settings.cache_path / "manifest.json").is_file()
    cache = settings.cache_path if prepared else prepare_cache(cfg.data)  # another node builds its own

    def report(metrics: dict, folder: Path | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(str(folder)) if folder else None
        tune.report({**metrics, "seed": cfg.seed}, checkpoint=checkpoint)

    checkpoint = tune.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as resume_dir:
        try:
            train(cfg, cache, trial_dir / "work", report=report, threads=settings.threads,
                  resume_from=Path(resume_dir) if resume_dir else None,
                  tensorboard_dir=trial_dir / "tensorboard")
        except LossNotFinite as err:
            print(f"trial stopped: {err}")
            tune.report({"step": err.step, "diverged": 1.0, "seed": cfg.seed})


def make_scheduler(config: SearchConfig, budget: int):
    if config.scheduler.name == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="step", max_t=budget, grace_period=config.scheduler.grace_period,
                         reduction_factor=config.scheduler.reduction_factor)


def make_search_alg(config: SearchConfig, budget: int):
    if config.search_alg.name == "optuna":
        from optuna.samplers import TPESampler

        return PruningOptunaSearch(sampler=TPESampler(seed=config.search_alg.seed), budget=budget)
    return BasicVariantGenerator(random_state=config.search_alg.seed)


def trial_budget(search: Search, example: ExperimentConfig) -> int:
    """ASHA's max_t: the training steps of a full trial."""
    if example.train.max_steps is None:
        raise UserError(f"{search.path}: a search needs a step budget: set num_train_steps "
                        "(ASHA's time axis is training steps).")
    return example.train.max_steps


def absolute_paths(tree: dict, data_root: Path | None) -> dict:
    """Trials run in their own folders: make the data paths absolute first."""
    data = dict(tree.get("data", {}))
    if data_root is not None:
        data["root"] = str(data_root)
    for key in ("root", "cache_dir"):
        if isinstance(data.get(key), str):
            data[key] = str(Path(data[key]).expanduser().resolve())
    return {**tree, "data": data}


def resolve_init_from(tree: dict, tracking_uri: str, dest: Path) -> dict:
    """`model.init_from` as a local weights file: an MLflow run or a search's best is fetched once."""
    from ich_tune.weights import resolve_weights

    spec = tree.get("model", {}).get("init_from")
    if not isinstance(spec, str):
        return tree
    path, _ = resolve_weights(spec, tracking_uri, dest)
    return {**tree, "model": {**tree["model"], "init_from": str(path.resolve())}}


def start_ray(options: RunOptions, log=print) -> None:
    """Join --address, or start a local Ray with its dashboard on 127.0.0.1, and say how to open it."""
    if ray.is_initialized():
        return
    kwargs = {"address": options.address} if options.address else {
        "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": DASHBOARD_PORT,
        "num_gpus": options.num_gpus}
    context = ray.init(**kwargs, log_to_driver=True)
    url = context.dashboard_url
    if url:
        token = Path.home() / ".ray" / "auth_token"
        how = (f"it asks for a token: paste the contents of {token} (`cat {token}`); for the REST API "
               f"send `Authorization: Bearer $(cat {token})`"
               if os.environ.get("RAY_AUTH_MODE") != "disabled" and token.exists()
               else "no token needed (RAY_AUTH_MODE=disabled)")
        log(f"Ray dashboard: http://{url} ({how})")


def resolve_run_dir(search: Search, options: RunOptions) -> Path:
    search_dir = (Path(search.config.storage) / search.name).resolve()
    if options.name:
        return search_dir / options.name
    if options.resume:
        candidates = sorted(p for p in search_dir.glob("*") if tune.Tuner.can_restore(str(p)))
        if not candidates:
            raise UserError(f"--resume: no search to resume under {search_dir}/; start one without "
                            "--resume, or give --name of an existing run.")
        return candidates[-1]
    return search_dir / time.strftime("%Y%m%d-%H%M%S")


@dataclass
class SearchOutcome:
    run_dir: Path
    parent_run_id: str
    tracking_uri: str
    trials: list[dict]  # one row per trial: id, status, steps, stopped_early, best metric, config
    best: dict | None  # the best row, with its checkpoint path


def run_search(search: Search, options: RunOptions, log=print) -> SearchOutcome:
    from mlflow.tracking import MlflowClient

    from ich_tune import tracking

    config = search.config
    run_dir = resolve_run_dir(search, options)
    if options.resume and not tune.Tuner.can_restore(str(run_dir)):
        raise UserError(f"--resume: {run_dir} holds no search state to resume.")
    if not options.resume and run_dir.exists():
        raise UserError(f"{run_dir} exists already: add --resume to continue it, or pick another --name.")
    storage = Path(config.storage).resolve()
    uri = options.tracking_uri or config.tracking_uri or tracking.default_tracking_uri(storage)
    experiment = resolve_init_from(absolute_paths(search.experiment, options.data_root), uri,
                                   storage / "init_weights" / search.name)
    first = search.trial_experiment(search.first_values, experiment)
    budget = trial_budget(search, first)
    cache = prepare_cache(first.data, log)  # once, before any trial starts

    start_ray(options, log)
    resources = {"cpu": config.resources.cpu, "gpu": config.resources.gpu}
    if resources["gpu"] and not ray.cluster_resources().get("GPU"):
        log(f"warning: no GPU in this Ray cluster; trials run on CPU (resources.gpu {resources['gpu']:g} "
            "ignored)")
        resources["gpu"] = 0

    storage.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(uri)
    exp_id = tracking.experiment_id(client, search.name, storage / "mlartifacts")
    parent_id = tracking.parent_run(client, exp_id, run_dir, run_dir.name, {
        "ich_tune.search_file": str(search.path), "ich_tune.search": search.name,
        tracking.TAG_METRIC: config.metric})
    if not options.resume:
        resolved = {**dataclasses.asdict(config), "experiment": experiment}
        client.log_text(parent_id, yaml.safe_dump(resolved, sort_keys=False), "search/resolved.yaml")
        client.log_artifact(parent_id, str(search.path), "search")
    log(f"MLflow: parent run {parent_id} in experiment '{search.name}'; compare trials with\n"
        f"  mlflow ui --backend-store-uri {uri}")
    log(f"TensorBoard: tensorboard --logdir {run_dir}")

    settings = TrialSettings(data=first.data, cache_path=cache, randomize_seed=config.randomize_seed,
                             threads=max(1, int(config.resources.cpu)), gpu_fraction=resources["gpu"])
    trainable = tune.with_resources(tune.with_parameters(run_trial, settings=settings), resources)
    if options.resume:
        log(f"resuming {run_dir}")
        tuner = tune.Tuner.restore(str(run_dir), trainable, resume_errored=True)
    else:
        callback = tracking.MlflowTrials(uri, exp_id, parent_id, budget)
        tuner = tune.Tuner(
            trainable,
            param_space=to_param_space(experiment, search.dimensions),
            tune_config=tune.TuneConfig(
                metric=config.metric, mode=config.mode, num_samples=config.num_samples,
                scheduler=make_scheduler(config, budget), search_alg=make_search_alg(config, budget),
                max_concurrent_trials=config.max_concurrent_trials),
            run_config=tune.RunConfig(
                name=run_dir.name, storage_path=str(run_dir.parent), callbacks=[callback],
                verbose=1,  # status tables and trial starts and ends; per-result tables drown the logs
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=config.keep_checkpoints, checkpoint_score_attribute=config.metric,
                    checkpoint_score_order=config.mode),
                failure_config=tune.FailureConfig(max_failures=config.max_failures)),
        )
    results = tuner.fit()
    rows = summarize(results, search, budget)
    best = pick_best(rows, config.mode)
    tracking.log_search_result(client, uri, parent_id, rows, best, cache)
    return SearchOutcome(run_dir, parent_id, uri, rows, best)


def summarize(results, search: Search, budget: int) -> list[dict]:
    """A row per trial: its dimensions' values, steps run, best metric, how it ended."""
    metric, mode = search.config.metric, search.config.mode
    rows = []
    for result in results:
        last = result.metrics or {}
        history = result.metrics_dataframe
        values = history[metric].dropna() if history is not None and metric in history.columns else ()
        steps = int(last.get("step", 0))
        checkpoint = result.get_best_checkpoint(metric, mode) if result.best_checkpoints else None
        rows.append({
            "trial_id": last.get("trial_id") or Path(result.path).name,
            "status": "error" if result.error else "finished",
            "steps": steps,
            "stopped_early": result.error is None and steps < budget,
            "best": float(max(values) if mode == "max" else min(values)) if len(values) else float("nan"),
            "metric": metric,
            "seed": last.get("seed"),
            "params": {d.path: _lookup(result.config or {}, d.path) for d in search.dimensions},
            "config": result.config,
            "history": history.to_dict("records") if history is not None else [],
            "checkpoint": Path(checkpoint.path) / CHECKPOINT_FILE if checkpoint else None,
            "path": result.path,
        })
    return rows


def pick_best(rows: list[dict], mode: str) -> dict | None:
    scored = [r for r in rows if r["best"] == r["best"] and r["checkpoint"]]  # NaN != NaN
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda r: r["best"])


def _lookup(tree: dict, dotted: str):
    for key in dotted.split("."):
        tree = tree.get(key, {}) if isinstance(tree, dict) else {}
    return tree if tree != {} else None
