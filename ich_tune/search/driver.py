"""A search from start to end: resolve its experiment, prepare the data on every node, open its MLflow
parent run, run the Tuner (fractional GPUs, a scheduler on training steps, grid or Optuna, resume) and
publish the best trial.

Each trial runs trial.py's function in a Ray worker, its output in its own log file. Every node
prepares the data before its first trial (nodes.py); the driver alone talks to MLflow. The console
shows our lines and the live view of the trials (console.py); Ray's and MLflow's lines go to
driver.log (driver_log.py), unless `run --verbose` asks for everything as it comes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ray
import yaml
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

from ich_tune.config.markers import to_param_space
from ich_tune.config.schema import SearchConfig
from ich_tune.data.prepare import prepare_cache, resolve_root
from ich_tune.errors import Interrupted, UserError
from ich_tune.experiment import Search, build_experiment
from ich_tune.search import storage
from ich_tune.search.cluster import start_ray
from ich_tune.search.console import LiveView, Plan
from ich_tune.search.driver_log import FILE_NAME, DriverLog
from ich_tune.search.nodes import DataOnNodes, data_variants
from ich_tune.search.options import RunOptions
from ich_tune.search.results import SearchOutcome, summarize
from ich_tune.search.run_folder import resolve_run_dir, run_lock
from ich_tune.search.schedulers import make_scheduler, rungs
from ich_tune.search.search_algs import make_search_alg, trial_count
from ich_tune.search.signals import GracefulStop
from ich_tune.search.ties import mark_ties
from ich_tune.search.trial import TrialSettings, run_trial
from ich_tune.tracking import client as tracking
from ich_tune.tracking.callback import MlflowTrials
from ich_tune.tracking.importance import Importance, what_mattered
from ich_tune.tracking.publish import log_search_result
from ich_tune.tracking.references import RESOLVED_ARTIFACT, resolve_weights
from ich_tune.tracking.tags import TAG_METRIC, TAG_MODE, TAG_SEARCH, TAG_SEARCH_FILE
from ich_tune.trials import TRIAL_LOG, TrialOutcome, best_of

log = logging.getLogger(__name__)

NEW_OUTPUT_ENV = "RAY_AIR_NEW_OUTPUT"


def run_search(search: Search, options: RunOptions) -> SearchOutcome:
    """Run (or --resume) a search while holding its run folder's lock."""
    run_dir = resolve_run_dir(search, options)
    root = storage.normalize(search.config.storage)
    local = storage.local_root(root, options.local_dir)
    if storage.is_uri(root):
        log.info(f"storage {root}; this machine's own files (run lock, default MLflow store, init weights) "
                 f"in {local}")
    storage.check_writable(storage.join(root, search.name))  # the lock of a local run lives there
    with run_lock(run_dir, local / "locks"):
        if options.resume and not storage.can_restore(run_dir):
            raise UserError(f"--resume: {run_dir} holds no search state to resume.")
        if not options.resume and storage.exists(run_dir):
            raise UserError(f"{run_dir} exists already: add --resume to continue it, or pick another --name.")
        if options.verbose:
            return _run(search, options, run_dir, local, None)
        with DriverLog() as library_log:
            return _run(search, options, run_dir, local, library_log)


def _run(search: Search, options: RunOptions, run_dir: str, local: Path,
         library_log: DriverLog | None) -> SearchOutcome:
    """Resolve, check the data, data on every node, MLflow parent run, Tuner, fit, publish."""
    stores = tracking.resolve_stores(options.tracking_uri, search.config.tracking_uri, local)
    uri = stores.tracking_uri
    experiment = resolve_experiment(search, options.data_root, uri, local)
    first = search.trial_experiment(search.first_values, experiment)
    budget = first.train.max_steps  # ASHA's max_t; load_search made sure there is one
    variants = data_variants(search, experiment)  # each node's caches, prepared once Ray is up
    resolve_root(first.data)  # missing data is one message before Ray starts
    log.info(stores.describe())

    resources = start_cluster(search.config, options)
    data = DataOnNodes(variants, options.rescan, capture=library_log is not None)
    data.prepare(resources)  # on every node that can run a trial, before any starts
    parent = ParentRun.open(search, experiment, run_dir, stores, local, options.resume)
    driver_log = driver_log_path(search, run_dir, local) if library_log else None
    say_where_to_look(search, parent, run_dir, driver_log)

    trainable = make_trainable(search, data, resources, echo=options.verbose)
    view = None if options.verbose else LiveView(plan_of(search, run_dir, budget))
    tuner = make_tuner(search, experiment, run_dir, trainable, parent, budget, options.resume, view)
    if library_log:
        library_log.open(driver_log)  # Tune has made the run folder
    trials = summarize(fit(tuner, parent, run_dir, view), search, budget)
    best = best_of(trials, search.config.mode)
    mattered = what_mattered(trials, search.dimensions, search.config.metric, search.config.mode)
    publish(search, parent, trials, best, mattered)
    return SearchOutcome(run_dir, parent.run_id, uri, trials, best, mattered)


def resolve_experiment(search: Search, data_root: Path | None, tracking_uri: str, local: Path) -> dict:
    """The experiment tree the trials get: its paths absolute, its init weights a local file."""
    return resolve_init_from(absolute_paths(search.experiment, data_root), tracking_uri,
                             local / "init_weights" / search.name)


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


def start_cluster(config: SearchConfig, options: RunOptions) -> dict[str, float]:
    """Ray started or joined; what each trial asks of it ({cpu, gpu}), on CPU where it has no GPU.
    Ray forwards its workers' output to this console under --verbose only: trials write their own."""
    start_ray(options.address, options.dashboard_port, options.num_gpus, log_to_driver=options.verbose)
    resources = {"cpu": config.resources.cpu, "gpu": config.resources.gpu}
    if resources["gpu"] and not ray.cluster_resources().get("GPU"):
        log.warning(f"warning: no GPU in this Ray cluster; trials run on CPU (resources.gpu "
                    f"{resources['gpu']:g} ignored)")
        resources["gpu"] = 0
    return resources


@dataclass
class ParentRun:
    """The search's MLflow run, parent of its trials' runs."""

    client: MlflowClient
    uri: str
    experiment_id: str
    run_id: str

    @classmethod
    def open(cls, search: Search, experiment: dict, run_dir: str, stores: tracking.Stores, local: Path,
             resume: bool) -> ParentRun:
        """The run of `run_dir`, created unless --resume finds it; a new one records the resolved search."""
        local.mkdir(parents=True, exist_ok=True)
        uri = stores.tracking_uri
        client = MlflowClient(uri, stores.registry_uri)
        exp_id = tracking.experiment_id(client, search.name,
                                        None if tracking.is_server(uri) else local / "mlartifacts")
        run_id = tracking.parent_run(client, exp_id, run_dir, storage.name_of(run_dir), {
            TAG_SEARCH_FILE: str(search.path), TAG_SEARCH: search.name,
            TAG_METRIC: search.config.metric, TAG_MODE: search.config.mode})
        if not resume:
            resolved = {**dataclasses.asdict(search.config), "experiment": experiment}
            client.log_text(run_id, yaml.safe_dump(resolved, sort_keys=False), RESOLVED_ARTIFACT)
            client.log_artifact(run_id, str(search.path), "search")
        return cls(client, uri, exp_id, run_id)

    def end_unfinished(self, status: str) -> None:
        tracking.end_unfinished(self.client, self.run_id, status)


def driver_log_path(search: Search, run_dir: str, local: Path) -> Path:
    """driver.log in the run folder; for a bucket, in this machine's own folder."""
    if storage.is_uri(run_dir):
        return local / search.name / storage.name_of(run_dir) / FILE_NAME
    return Path(run_dir) / FILE_NAME


def plan_of(search: Search, run_dir: str, budget: int) -> Plan:
    config = search.config
    return Plan(metric=config.metric, mode=config.mode, budget=budget,
                dimensions=[d.path for d in search.dimensions], total_trials=search.num_trials,
                run_dir=run_dir, rungs=rungs(config, budget),
                reduction_factor=config.scheduler.reduction_factor)


def say_where_to_look(search: Search, parent: ParentRun, run_dir: str, driver_log: Path | None) -> None:
    """Where to compare the trials while they run (MLflow's UI and TensorBoard), and where their logs
    are."""
    log.info(f"MLflow: parent run {parent.run_id} in experiment '{search.name}'; compare trials: "
             f"{tracking.ui_hint(parent.uri, parent.experiment_id)}")
    if storage.is_uri(run_dir):  # TensorBoard reads local folders only
        log.info(f"TensorBoard: copy the trials' tensorboard/ folders from {run_dir} to a local folder and "
                 "run tensorboard --logdir on it")
    else:
        log.info(f"TensorBoard: tensorboard --logdir {run_dir}")
    where = f"; Ray's and MLflow's in {driver_log}" if driver_log else ""
    log.info(f"logs: each trial's output in {TRIAL_LOG} in its folder{where}")


def make_trainable(search: Search, data: DataOnNodes, resources: dict[str, float], echo: bool):
    """The trial function with what every trial needs, asking Ray for `resources` each; `echo`: its
    output reaches the console too."""
    config = search.config
    settings = TrialSettings(data=data, randomize_seed=config.randomize_seed,
                             threads=max(1, int(config.resources.cpu)), gpu_fraction=resources["gpu"],
                             metric=config.metric, mode=config.mode,
                             dimensions=[d.path for d in search.dimensions], echo=echo)
    return tune.with_resources(tune.with_parameters(run_trial, settings=settings), resources)


def make_tuner(search: Search, experiment: dict, run_dir: str, trainable, parent: ParentRun, budget: int,
               resume: bool, view: LiveView | None) -> tune.Tuner:
    """A new Tuner writing `run_dir`, or for --resume the one saved there; `view` shows it (else Ray's
    own status tables do, as under --verbose)."""
    # trials write their own TensorBoard logs (curves, HParams); Ray's default TensorBoard logger would
    # add a second HParams experiment with other names, and the dashboard shows one of the two at random.
    # Set for the whole process and left set: every search it runs wants the same, and the CSV and JSON
    # loggers are passed explicitly below
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    if resume:
        log.info(f"resuming {run_dir}")
        tuner = tune.Tuner.restore(run_dir, trainable, resume_errored=True)
        # Tuner.restore takes no callbacks: the restored run config gets this run's view through Ray's
        # private _local_tuner (read in Ray 2.60; Tuner has no public accessor for its run config)
        show_with(tuner._local_tuner.get_run_config(), view)
        return tuner
    config = search.config
    dimensions = [d.path for d in search.dimensions]
    callback = MlflowTrials(parent.uri, parent.experiment_id, parent.run_id, budget, dimensions)
    run_config = tune.RunConfig(
        name=storage.name_of(run_dir), storage_path=storage.parent(run_dir),
        callbacks=[callback, CSVLoggerCallback(), JsonLoggerCallback()],
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=config.keep_checkpoints, checkpoint_score_attribute=config.metric,
            checkpoint_score_order=config.mode),
        failure_config=tune.FailureConfig(max_failures=config.max_failures))
    show_with(run_config, view)
    return tune.Tuner(
        trainable,
        param_space=to_param_space(experiment, search.dimensions),
        tune_config=tune.TuneConfig(
            metric=config.metric, mode=config.mode, num_samples=trial_count(search),
            scheduler=make_scheduler(config, budget), search_alg=make_search_alg(search, budget),
            max_concurrent_trials=config.max_concurrent_trials),
        run_config=run_config,
    )


def show_with(run_config: tune.RunConfig, view: LiveView | None) -> None:
    """`view` among the run's callbacks and Ray's status tables off, or without a view Ray's tables:
    trial starts and ends and a status table now and then (per-result tables drown the logs).

    Ray restores a resumed search's run config, callbacks included, from its saved state (reached
    through the restored Tuner's own object, as Tuner.restore takes no callbacks): its view is
    replaced by this run's, which follows this run's --verbose."""
    kept = [callback for callback in run_config.callbacks or [] if not isinstance(callback, LiveView)]
    run_config.callbacks = [*kept, view] if view else kept
    run_config.verbose = 0 if view else 1


def fit(tuner: tune.Tuner, parent: ParentRun, run_dir: str, view: LiveView | None) -> tune.ResultGrid:
    """The trials run; a search that fails or is stopped ends its parent run FAILED or KILLED, and a
    signal's stop raises Interrupted once Tune has saved the search in `run_dir`. The live view ends
    with it, however it ends."""
    stop = GracefulStop()
    try:
        with stop, ray_tables_off() if view else contextlib.nullcontext():
            results = tuner.fit()
    except BaseException as err:
        parent.end_unfinished("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        if view:
            view.close()
    if stop.signal is not None:
        parent.end_unfinished("KILLED")
        raise Interrupted(f"search stopped by {signal.Signals(stop.signal).name}; its state is saved in "
                          f"{run_dir}", stop.signal, run_dir)
    return results


@contextlib.contextmanager
def ray_tables_off() -> Iterator[None]:
    """Ray Tune's output at verbose 0 without the table of the search's settings and the "View detailed
    results here" line that its newer output engine prints at any verbosity: its older engine, which
    RAY_AIR_NEW_OUTPUT=0 picks when `fit` starts, prints nothing at 0."""
    previous = os.environ.get(NEW_OUTPUT_ENV)
    os.environ[NEW_OUTPUT_ENV] = "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(NEW_OUTPUT_ENV)
        else:
            os.environ[NEW_OUTPUT_ENV] = previous


def publish(search: Search, parent: ParentRun, trials: list[TrialOutcome], best: TrialOutcome | None,
            importance: Importance) -> None:
    """The parent run's end: the trials, and the best trial's model, plots and registered version."""
    config = search.config
    # the best trial's own data settings (a searched data.lod or channels may differ from the first
    # trial's) for its plots and the registry's fingerprint; already built where the driver's node ran trials
    cache = prepare_cache(build_experiment(best.config, {}).data) if best else None
    if best is not None:
        log.info(mark_ties(trials, best, config.metric, config.mode, cache))
    # a checkpoint may sit in a bucket: Ray fetches it into a local folder (or hands over its own)
    with best.checkpoint.as_directory() if best else contextlib.nullcontext() as folder:
        published = log_search_result(
            parent.client, parent.uri, parent.run_id, trials, best, Path(folder) if folder else None, cache,
            config.metric, mode=config.mode,
            registered_model=search.name if config.registered_model is None else config.registered_model,
            importance=importance)
    for line in published.lines() if published else []:
        log.info(line)
