"""Builds and runs the Tuner: fractional GPUs, ASHA on training steps, grid or Optuna, resume.

The trial function is the plain training loop with Ray Tune's `report` plugged in. Every node
prepares the data before its first trial (nodes.py); the driver alone talks to MLflow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import math
import os
import signal
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ray
import yaml
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule, TrialScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from ich_tune.config.markers import to_param_space
from ich_tune.config.schema import SearchConfig
from ich_tune.data.prepare import prepare_cache, resolve_root
from ich_tune.errors import Interrupted, UserError
from ich_tune.experiment import Search, build_experiment
from ich_tune.logs import to_stdout
from ich_tune.search import storage
from ich_tune.search.cluster import start_ray
from ich_tune.search.nodes import DataOnNodes, data_variants
from ich_tune.tracking import client as tracking
from ich_tune.tracking.callback import MlflowTrials
from ich_tune.tracking.publish import log_search_result
from ich_tune.tracking.references import resolve_weights
from ich_tune.tracking.tags import TAG_METRIC, TAG_MODE
from ich_tune.training.loop import TrainingFailed, train, write_hparams
from ich_tune.trials import (
    DIVERGED,
    ENDED_KEY,
    ERROR,
    MESSAGE_KEY,
    NODE_KEY,
    TrialOutcome,
    best_of,
    how_it_ended,
    one_line,
    worst,
)

PID_FILE = "worker.pid"  # in each trial's folder: the process that trains it, on its node


@dataclass
class RunOptions:
    data_root: Path | None = None
    address: str | None = None  # join an existing Ray cluster instead of starting one
    resume: bool = False
    tracking_uri: str | None = None
    name: str | None = None  # the run folder under <storage>/<search name>/; default a timestamp
    num_gpus: int | None = None  # logical GPUs declared when starting a local Ray
    dashboard_port: int | None = None  # default cluster.DASHBOARD_PORT
    local_dir: Path | None = None  # the driver's own files when storage is a URI; default ~/.cache/ich_tune
    rescan: bool = False  # every node checks every file of each data variant rather than trusting its caches


@dataclass
class TrialSettings:
    """What every trial needs besides its config; shipped once through Ray's object store."""

    data: DataOnNodes  # each node's caches, prepared before its first trial
    randomize_seed: bool
    threads: int
    gpu_fraction: float
    metric: str
    mode: str
    dimensions: list[str]  # the searched keys, dotted


class PruningOptunaSearch(OptunaSearch):
    """Optuna hears of trials that ASHA stopped before their budget, and of diverged trials, as
    pruned (a bad region to learn from), and of trials that ended in an error as failed."""

    def __init__(self, *args, budget: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.budget = budget

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        from optuna.trial import TrialState

        if result and not error and trial_id not in self._completed_trials:
            ended = result.get(ENDED_KEY)
            state = TrialState.FAIL if ended == ERROR else TrialState.PRUNED if (
                ended == DIVERGED or result.get("step", self.budget) < self.budget) else None
            if state is not None:
                self._ot_study.tell(self._ot_trials[trial_id], state=state)
                self._completed_trials.add(trial_id)
                return
        super().on_trial_complete(trial_id, result, error)


def run_trial(config: dict, settings: TrialSettings) -> None:
    """One trial: the training loop, reporting each validation and checkpoint to Ray Tune."""
    import torch

    to_stdout()  # what the trial says goes to its output, as in the driver
    cfg = build_experiment(config, {})
    context = tune.get_context()
    trial_dir = Path(context.get_trial_dir())
    (trial_dir / PID_FILE).write_text(f"{os.getpid()}\n")
    if settings.randomize_seed:  # stable across retries of the same trial
        cfg.seed = zlib.crc32(context.get_trial_id().encode())
    if torch.cuda.is_available() and 0 < settings.gpu_fraction < 1:
        cfg.train.cuda_memory_fraction = cfg.train.cuda_memory_fraction or settings.gpu_fraction
    cache = settings.data.cache_for(cfg.data)  # waits for this node's preparation; never builds

    node_id = ray.get_runtime_context().get_node_id()  # which machine trained it, in every result

    def report(metrics: dict, folder: Path | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(str(folder)) if folder else None
        tune.report({**metrics, "seed": cfg.seed, NODE_KEY: node_id}, checkpoint=checkpoint)

    checkpoint = tune.get_checkpoint()
    if cfg.logging.tensorboard and checkpoint is None:  # once, not again on a restart
        searched = {path: _lookup(config, path) for path in settings.dimensions}
        write_hparams(trial_dir / "tensorboard", searched)
    # checkpoints are staged outside the trial folder, which Ray syncs to storage as it pleases: a folder
    # deleted after tune.report has copied it must not be half-synced
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as resume_dir, \
            tempfile.TemporaryDirectory(prefix="ich_tune-checkpoints-") as staging:
        try:
            train(cfg, cache, Path(staging), report=report, threads=settings.threads,
                  resume_from=Path(resume_dir) if resume_dir else None,
                  tensorboard_dir=trial_dir / "tensorboard")
        except TrainingFailed as err:  # NaN loss, out of memory: a retry would fail the same way
            print(f"trial ended ({err.status}): {err}")
            tune.report({"step": err.step or 0, settings.metric: worst(settings.mode), ENDED_KEY: err.status,
                         MESSAGE_KEY: one_line(str(err)), "seed": cfg.seed, NODE_KEY: node_id})


class MedianStopping(MedianStoppingRule):
    """Ray's median stopping rule without its time-slicing: a trial with too few peers to compare with
    runs on, where Ray's would pause it for pending trials (and a paused trial restarts from its
    checkpoint in a new process)."""

    def _on_insufficient_samples(self, tune_controller, trial, time: float) -> str:
        return TrialScheduler.CONTINUE


def make_scheduler(config: SearchConfig, budget: int):
    if config.scheduler.name == "fifo":
        return FIFOScheduler()
    if config.scheduler.name == "median":
        return MedianStopping(time_attr="step", grace_period=config.scheduler.grace_period)
    return ASHAScheduler(time_attr="step", max_t=budget, grace_period=config.scheduler.grace_period,
                         reduction_factor=config.scheduler.reduction_factor)


def make_search_alg(search: Search, budget: int):
    config = search.config
    if config.search_alg.name == "optuna":
        from optuna.samplers import TPESampler

        return PruningOptunaSearch(sampler=TPESampler(seed=config.search_alg.seed), budget=budget)
    shuffled = config.search_alg.name == "shuffled"
    # Tune applies max_concurrent_trials to Searchers (Optuna) only; the variant generator takes it itself
    return BasicVariantGenerator(random_state=config.search_alg.seed,
                                 max_concurrent=config.max_concurrent_trials or 0,
                                 points_to_evaluate=shuffled_grid(search) if shuffled else None)


def shuffled_grid(search: Search) -> list[dict]:
    """Every grid point, once per sample, in a random order (seeded): with the grid's own order, the
    first trials pass ASHA's rungs only because no one has reached them yet. Ray runs each point
    as one trial, so the search needs num_samples = len(points) (see trial_count)."""
    import random

    grid = [d for d in search.dimensions if d.kind == "grid_search"]
    points = []
    for values in itertools.product(*(d.args for d in grid)):
        point: dict = {}  # nested like the param space: {"optimizer": {"lr": 0.001}, ...}
        for dim, value in zip(grid, values, strict=True):
            *parents, last = dim.path.split(".")
            node = point
            for key in parents:
                node = node.setdefault(key, {})
            node[last] = value
        points.append(point)
    points *= search.config.num_samples
    random.Random(search.config.search_alg.seed).shuffle(points)
    return points


def trial_count(search: Search) -> int:
    """Tune's num_samples: a shuffled grid hands Ray each of its trials as a point of its own."""
    return search.num_trials if search.config.search_alg.name == "shuffled" else search.config.num_samples


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
    spec = tree.get("model", {}).get("init_from")
    if not isinstance(spec, str):
        return tree
    path, _ = resolve_weights(spec, tracking_uri, dest)
    return {**tree, "model": {**tree["model"], "init_from": str(path.resolve())}}


@contextlib.contextmanager
def run_lock(run_dir: str | Path, lock_dir: Path | None = None) -> Iterator[None]:
    """Held while a driver writes `run_dir`: a second `run` of the same folder (a --resume, or the same
    --name) is refused instead of corrupting the first. The kernel drops it when the driver dies.

    The lock file sits beside a local run folder; for a URI, in `lock_dir` on this machine (a bucket
    has no locks), so it guards against a second driver here only."""
    run_dir = str(run_dir)
    if storage.is_uri(run_dir):
        lock_file = lock_dir / f"{hashlib.sha1(run_dir.encode()).hexdigest()[:16]}.lock"
    else:
        lock_file = Path(run_dir).parent / f".{Path(run_dir).name}.lock"
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as err:
        raise UserError(f"{run_dir}: cannot write its lock file {lock_file} ({err.strerror}).") from None
    with open(fd, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise UserError(f"{run_dir}: another `run` (pid {lock.read().strip() or '?'}) is writing this "
                            "search now; wait for it to end, or start another with a new --name.") from None
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        yield


class GracefulStop:
    """Ctrl-C or SIGTERM during `fit`: Ray Tune's own graceful stop (SIGUSR1), which stops the trials
    and saves the search's state for --resume. A second signal stops at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may set signal handlers; Tune then sets none either
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Tune would not tell us it was interrupted
        for number in (signal.SIGINT, signal.SIGTERM):
            self._previous[number] = signal.signal(number, self._handle)
        self._previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self._before_tune)
        return self

    @staticmethod
    def _before_tune(number: int, frame) -> None:
        raise KeyboardInterrupt  # a stop before Tune has set up its own handler: nothing to save yet

    def _handle(self, number: int, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = number
        os.kill(os.getpid(), signal.SIGUSR1)

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


def resolve_run_dir(search: Search, options: RunOptions) -> str:
    """The run folder, a path or a URI: --name, the latest resumable run for --resume, or a new one."""
    search_dir = storage.join(storage.normalize(search.config.storage), search.name)
    if options.name:
        return storage.join(search_dir, options.name)
    if options.resume:
        candidates = [run for run in storage.children(search_dir) if storage.can_restore(run)]
        if not candidates:
            raise UserError(f"--resume: no search to resume under {search_dir}/; start one without "
                            "--resume, or give --name of an existing run.")
        return candidates[-1]
    return storage.join(search_dir, time.strftime("%Y%m%d-%H%M%S"))


@dataclass
class SearchOutcome:
    run_dir: str  # a local folder, or a URI
    parent_run_id: str
    tracking_uri: str
    trials: list[TrialOutcome]
    best: TrialOutcome | None


def run_search(search: Search, options: RunOptions, log=print) -> SearchOutcome:
    """Run (or --resume) a search while holding its run folder's lock."""
    run_dir = resolve_run_dir(search, options)
    root = storage.normalize(search.config.storage)
    local = storage.local_root(root, options.local_dir)
    if storage.is_uri(root):
        log(f"storage {root}; this machine's own files (run lock, default MLflow store, init weights) "
            f"in {local}")
    storage.check_writable(storage.join(root, search.name))  # the lock of a local run lives there
    with run_lock(run_dir, local / "locks"):
        if options.resume and not storage.can_restore(run_dir):
            raise UserError(f"--resume: {run_dir} holds no search state to resume.")
        if not options.resume and storage.exists(run_dir):
            raise UserError(f"{run_dir} exists already: add --resume to continue it, or pick another --name.")
        return _run(search, options, run_dir, local, log)


def _run(search: Search, options: RunOptions, run_dir: str, local: Path, log) -> SearchOutcome:
    config = search.config
    uri = options.tracking_uri or config.tracking_uri or tracking.default_tracking_uri(local)
    experiment = resolve_init_from(absolute_paths(search.experiment, options.data_root), uri,
                                   local / "init_weights" / search.name)
    first = search.trial_experiment(search.first_values, experiment)
    budget = first.train.max_steps  # ASHA's max_t; load_search made sure there is one
    variants = data_variants(search, experiment)  # each node's caches, prepared once Ray is up
    resolve_root(first.data)  # missing data is one message before Ray starts

    start_ray(options.address, options.dashboard_port, options.num_gpus, log)
    resources = {"cpu": config.resources.cpu, "gpu": config.resources.gpu}
    if resources["gpu"] and not ray.cluster_resources().get("GPU"):
        log(f"warning: no GPU in this Ray cluster; trials run on CPU (resources.gpu {resources['gpu']:g} "
            "ignored)")
        resources["gpu"] = 0
    data = DataOnNodes(variants, options.rescan)
    data.prepare(resources, log)  # on every node that can run a trial, before any starts

    local.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(uri)
    exp_id = tracking.experiment_id(client, search.name,
                                    None if tracking.is_server(uri) else local / "mlartifacts")
    parent_id = tracking.parent_run(client, exp_id, run_dir, storage.name_of(run_dir), {
        "ich_tune.search_file": str(search.path), "ich_tune.search": search.name,
        TAG_METRIC: config.metric, TAG_MODE: config.mode})
    if not options.resume:
        resolved = {**dataclasses.asdict(config), "experiment": experiment}
        client.log_text(parent_id, yaml.safe_dump(resolved, sort_keys=False), "search/resolved.yaml")
        client.log_artifact(parent_id, str(search.path), "search")
    log(f"MLflow: parent run {parent_id} in experiment '{search.name}'; compare trials: "
        f"{tracking.ui_hint(uri, exp_id)}")
    if storage.is_uri(run_dir):  # TensorBoard reads local folders only
        log(f"TensorBoard: copy the trials' tensorboard/ folders from {run_dir} to a local folder and run "
            "tensorboard --logdir on it")
    else:
        log(f"TensorBoard: tensorboard --logdir {run_dir}")

    settings = TrialSettings(data=data, randomize_seed=config.randomize_seed,
                             threads=max(1, int(config.resources.cpu)), gpu_fraction=resources["gpu"],
                             metric=config.metric, mode=config.mode,
                             dimensions=[d.path for d in search.dimensions])
    trainable = tune.with_resources(tune.with_parameters(run_trial, settings=settings), resources)
    # trials write their own TensorBoard logs (curves, HParams); Ray's default TensorBoard logger would
    # add a second HParams experiment with other names, and the dashboard shows one of the two at random.
    # Set for the whole process and left set: every search it runs wants the same, and the CSV and JSON
    # loggers are passed explicitly below
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    if options.resume:
        log(f"resuming {run_dir}")
        tuner = tune.Tuner.restore(run_dir, trainable, resume_errored=True)
    else:
        callback = MlflowTrials(uri, exp_id, parent_id, budget, [d.path for d in search.dimensions])
        tuner = tune.Tuner(
            trainable,
            param_space=to_param_space(experiment, search.dimensions),
            tune_config=tune.TuneConfig(
                metric=config.metric, mode=config.mode, num_samples=trial_count(search),
                scheduler=make_scheduler(config, budget), search_alg=make_search_alg(search, budget),
                max_concurrent_trials=config.max_concurrent_trials),
            run_config=tune.RunConfig(
                name=storage.name_of(run_dir), storage_path=storage.parent(run_dir),
                callbacks=[callback, CSVLoggerCallback(), JsonLoggerCallback()],
                verbose=1,  # status tables and trial starts and ends; per-result tables drown the logs
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=config.keep_checkpoints, checkpoint_score_attribute=config.metric,
                    checkpoint_score_order=config.mode),
                failure_config=tune.FailureConfig(max_failures=config.max_failures)),
        )
    stop = GracefulStop()
    try:
        with stop:
            results = tuner.fit()
    except BaseException as err:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        tracking.end_unfinished(client, parent_id, status)
        raise
    if stop.signal is not None:
        tracking.end_unfinished(client, parent_id, "KILLED")
        raise Interrupted(f"search stopped by {signal.Signals(stop.signal).name}; its state is saved in "
                          f"{run_dir}", stop.signal, run_dir)
    trials = summarize(results, search, budget)
    best = best_of(trials, config.mode)
    # the best trial's own data settings (a searched data.lod or channels may differ from the first
    # trial's) for its plots and the registry's fingerprint; already built where the driver's node ran trials
    cache = prepare_cache(build_experiment(best.config, {}).data) if best else None
    # a checkpoint may sit in a bucket: Ray fetches it into a local folder (or hands over its own)
    with best.checkpoint.as_directory() if best else contextlib.nullcontext() as folder:
        published = log_search_result(
            client, uri, parent_id, trials, best, Path(folder) if folder else None, cache, config.metric,
            mode=config.mode, registered_model=search.name if config.registered_model is None
            else config.registered_model)
    for line in published.lines() if published else []:
        log(line)
    return SearchOutcome(run_dir, parent_id, uri, trials, best)


def summarize(results, search: Search, budget: int) -> list[TrialOutcome]:
    """How each trial ended, its steps, its best metric, and its best checkpoint (Ray's handle: it may
    live in a bucket)."""
    metric, mode = search.config.metric, search.config.mode
    outcomes = []
    for result in results:
        last = result.metrics or {}
        history = result.metrics_dataframe
        rows = history.to_dict("records") if history is not None else []
        validations = [row for row in rows if not isinstance(row.get(ENDED_KEY), str)]  # NaN where absent
        values = [row[metric] for row in validations
                  if isinstance(row.get(metric), (int, float)) and math.isfinite(row[metric])]
        steps = max((int(row["step"]) for row in rows), default=0)  # a diverged trial's last step included
        status, message = how_it_ended(last, budget, result.error)
        checkpoint = result.get_best_checkpoint(metric, mode) if result.best_checkpoints else None
        outcomes.append(TrialOutcome(
            trial_id=last.get("trial_id") or Path(result.path).name, status=status, steps=steps,
            best=float((max if mode == "max" else min)(values)) if values else float("nan"),
            params={d.path: _lookup(result.config or {}, d.path) for d in search.dimensions},
            message=message, seed=last.get("seed"), config=result.config, history=validations,
            checkpoint=checkpoint))
    return outcomes


def _lookup(tree: dict, dotted: str):
    for key in dotted.split("."):
        tree = tree.get(key, {}) if isinstance(tree, dict) else {}
    return tree if tree != {} else None
