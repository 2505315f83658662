"""MLflow records of a search: one parent run per search, one nested child run per trial.

Only the driver talks to MLflow (a Tune callback), so it works the same on a multi-node cluster.
MLflow itself is the source of truth for what was already logged: on resume, the parent run is
found by its tag and each trial's child run by the trial id, so nothing is created twice and
replayed steps are not logged twice.
"""

from __future__ import annotations

import csv
import math
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient
from ray import tune

from ich_tune.train import CHECKPOINT_FILE, EXAMPLES_FILE, VALIDATION_FILE
from ich_tune.trials import (
    COMPLETED,
    ENDED_KEY,
    ERROR,
    MESSAGE_KEY,
    NODE_KEY,
    TrialOutcome,
    checkpoint_uri,
    how_it_ended,
    one_line,
)

TAG_SEARCH_DIR = "ich_tune.search_dir"
TAG_TRIAL_ID = "ich_tune.trial_id"
TAG_PARENT = "mlflow.parentRunId"
TAG_ENDED = "ich_tune.ended"  # on a trial's run: finished, stopped early, diverged or error
TAG_MESSAGE = "ich_tune.message"  # ... why it diverged or failed (or, while it runs, its last crash)
TAG_RESTARTS = "ich_tune.restarts"  # how often a crashed trial was restarted from its checkpoint
TAG_METRIC = "ich_tune.metric"  # the metric the search optimised, on its parent run
TAG_MODE = "ich_tune.mode"  # ... and whether higher (max) or lower (min) is better
TAG_EXPERIMENT_KIND, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
TAG_DESCRIPTION = "mlflow.note.content"  # what MLflow's UI shows as a run's description
TAG_NODE = "ich_tune.node_id"  # the Ray node training a trial (it changes when a restart moves it)


def default_tracking_uri(folder: Path) -> str:
    """SQLite in the driver's local folder: the embedded store for one machine."""
    return f"sqlite:///{(folder / 'mlflow.db').resolve()}"


def is_server(tracking_uri: str) -> bool:
    """An `mlflow server` (http or https): it stores the artifacts, and any machine that reaches it
    can fetch them."""
    return tracking_uri.startswith(("http://", "https://"))


def ui_hint(tracking_uri: str, experiment: str | None = None) -> str:
    """How to look at the runs: the server's page, or `mlflow ui` over a local store."""
    if is_server(tracking_uri):
        page = f"/#/experiments/{experiment}" if experiment else ""
        return f"open {tracking_uri.rstrip('/')}{page}"
    return f"mlflow ui --backend-store-uri {tracking_uri}"


def experiment_id(client: MlflowClient, name: str, artifact_root: Path | None) -> str:
    """The MLflow experiment of a search name, marked as model training so that MLflow 3's UI opens it
    on its runs (not on the GenAI overview). Its artifacts go under `artifact_root` on this machine, or,
    with None, where the tracking server keeps them (`mlflow-artifacts:/...`)."""
    found = client.get_experiment_by_name(name)
    if found is None:
        location = (artifact_root / name).resolve().as_uri() if artifact_root is not None else None
        return client.create_experiment(name, artifact_location=location,
                                        tags={TAG_EXPERIMENT_KIND: TRAINING_KIND})
    if TAG_EXPERIMENT_KIND not in found.tags:
        client.set_experiment_tag(found.experiment_id, TAG_EXPERIMENT_KIND, TRAINING_KIND)
    return found.experiment_id


def trial_run_name(config: dict, dimensions: list[str]) -> str:
    """A trial's run name: the values it was given, e.g. "lr=0.002 dropout=0.15", so MLflow's runs
    table reads without opening each run. Short names unless two dimensions end alike."""
    leaves = [path.rpartition(".")[2] for path in dimensions]
    names = leaves if len(set(leaves)) == len(leaves) else dimensions
    flat = flatten(config)
    return " ".join(f"{name}={flat.get(path)}" for name, path in zip(names, dimensions, strict=True))


def parent_run(client: MlflowClient, exp_id: str, search_dir: Path, run_name: str,
               tags: dict[str, str]) -> str:
    """The search's parent run: the existing one for this Ray experiment folder, or a new one."""
    runs = client.search_runs([exp_id], f"tags.`{TAG_SEARCH_DIR}` = '{search_dir}'", max_results=1)
    if runs:
        client.update_run(runs[0].info.run_id, status="RUNNING")
        return runs[0].info.run_id
    run = client.create_run(exp_id, run_name=run_name, tags={TAG_SEARCH_DIR: str(search_dir), **tags})
    return run.info.run_id


def end_unfinished(client: MlflowClient, parent_run_id: str, status: str) -> None:
    """A search that stops before its end: its parent run and its running trials' runs end `status`
    (KILLED on Ctrl-C), not RUNNING forever; --resume sets them running again."""
    for run in child_runs(client, parent_run_id):
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status)
    client.set_terminated(parent_run_id, status)


def child_runs(client: MlflowClient, parent_run_id: str) -> list:
    """The trial runs of a search's parent run."""
    experiment = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([experiment], f"tags.`{TAG_PARENT}` = '{parent_run_id}'", max_results=10000)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"model": {"dropout": 0.1}} -> {"model.dropout": 0.1}."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def numeric(result: dict) -> dict[str, float]:
    """The reported numbers worth keeping: our metrics, not Ray's bookkeeping or text."""
    keep = {}
    for key, value in result.items():
        if (key.startswith("val_") or key in ("epoch", "seed", "diverged", "time_total_s")) and \
                isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            keep[key] = float(value)
    return keep


class MlflowTrials(tune.Callback):
    """A child run per trial under the search's parent run, every reported metric at its step."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, budget: int,
                 dimensions: list[str]) -> None:
        self.tracking_uri, self.experiment_id = tracking_uri, experiment_id
        self.parent_run_id, self.budget = parent_run_id, budget
        self.dimensions = dimensions  # the searched keys, dotted: they name the trial runs
        self.client: MlflowClient | None = None
        self.runs: dict[str, str] = {}  # trial id -> child run id
        self.last_step: dict[str, int] = {}  # trial id -> last step logged
        self.nodes: dict[str, str] = {}  # trial id -> the node id last tagged

    def __getstate__(self) -> dict:
        return {**self.__dict__, "client": None}  # pickled with the Tuner's state; clients are not

    def setup(self, **info: Any) -> None:
        self.client = MlflowClient(self.tracking_uri)
        for run in self.client.search_runs([self.experiment_id],
                                           f"tags.`{TAG_PARENT}` = '{self.parent_run_id}'",
                                           max_results=10000):
            trial_id = run.data.tags.get(TAG_TRIAL_ID)
            if trial_id:
                self.runs[trial_id] = run.info.run_id
                self.last_step[trial_id] = int(run.data.metrics.get("step", -1))

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.trial_id in self.runs:  # a resumed or retried trial keeps its run
            self.client.update_run(self.runs[trial.trial_id], status="RUNNING")
            return
        name = trial_run_name(trial.config, self.dimensions) if self.dimensions else str(trial)
        run = self.client.create_run(self.experiment_id, run_name=name, tags={
            TAG_PARENT: self.parent_run_id, TAG_TRIAL_ID: trial.trial_id})
        params = [Param(k, str(v)[:6000]) for k, v in flatten(trial.config).items()]
        for start in range(0, len(params), 100):
            self.client.log_batch(run.info.run_id, params=params[start:start + 100])
        self.runs[trial.trial_id] = run.info.run_id
        self.last_step[trial.trial_id] = -1

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        step, now = int(result.get("step", -1)), int(time.time() * 1000)
        new = step > self.last_step.get(trial.trial_id, -1)  # else replayed after a restore: logged already
        if ENDED_KEY in result:  # the trial gave up: its metric is a stand-in worst value, not a measurement
            metrics = [Metric("step", step, now, step)] if new else []
            self.client.log_batch(self.runs[trial.trial_id], metrics=metrics, tags=[
                RunTag(TAG_ENDED, result[ENDED_KEY]), RunTag(TAG_MESSAGE, result.get(MESSAGE_KEY, ""))])
        elif new:
            metrics = [Metric(k, v, now, step) for k, v in {**numeric(result), "step": step}.items()]
            self.client.log_batch(self.runs[trial.trial_id], metrics=metrics)
        self.last_step[trial.trial_id] = max(step, self.last_step.get(trial.trial_id, -1))
        if result.get(NODE_KEY) and result[NODE_KEY] != self.nodes.get(trial.trial_id):
            self.client.set_tag(self.runs[trial.trial_id], TAG_NODE, result[NODE_KEY])
            self.nodes[trial.trial_id] = result[NODE_KEY]

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
        """The trial's example grid (written at its plot interval) goes to its run."""
        with checkpoint.as_directory() as folder:
            grid = Path(folder) / EXAMPLES_FILE
            if grid.is_file():
                step = self.last_step.get(trial.trial_id, 0)
                self.client.log_artifact(self.runs[trial.trial_id], str(grid), f"plots/step_{step:07d}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self.runs[trial.trial_id]
        ended, _ = how_it_ended(trial.last_result or {}, self.budget)
        if ENDED_KEY not in (trial.last_result or {}):  # a trial that gave up has its tags already
            self.client.log_batch(run_id, tags=[RunTag(TAG_ENDED, ended)])
        self.client.set_terminated(run_id, "FINISHED" if ended in COMPLETED else "FAILED")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A crashed trial that Ray restarts from its checkpoint: its run says so, and goes on."""
        self.client.log_batch(self.runs[trial.trial_id], tags=[
            RunTag(TAG_RESTARTS, str(trial.num_failures)), RunTag(TAG_MESSAGE, _last_error(trial))])

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self.runs[trial.trial_id]
        self.client.log_batch(run_id, tags=[RunTag(TAG_ENDED, ERROR),
                                            RunTag(TAG_MESSAGE, _last_error(trial))])
        self.client.set_terminated(run_id, "FAILED")


def _last_error(trial: Any) -> str:
    """The trial's latest exception as one line (Ray keeps it in the trial's folder)."""
    error = trial.get_pickled_error() or trial.get_error()
    return one_line(error)[:5000] if error else "unknown error"


def write_plots(checkpoint_dir: Path, history: list[dict], cache_path: Path, config, out: Path) -> None:
    """The best model's example grid, per-class ROC curves and training curves, as PNG files."""
    from ich_tune.data.cache import open_cache
    from ich_tune.plots import example_grid, roc_curves, training_curves

    validation = np.load(checkpoint_dir / VALIDATION_FILE)
    probs, labels = validation["probs"], validation["labels"]
    rows = open_cache(cache_path).rows(validation["indices"])
    (out / "examples.png").write_bytes(example_grid(rows, labels, probs, config.logging.plot_examples,
                                                    config.logging.plot_baseline, seed=config.seed))
    (out / "roc.png").write_bytes(roc_curves(probs, labels))
    (out / "curves.png").write_bytes(training_curves(history))


def write_trials_csv(trials: list[TrialOutcome], metric: str, path: Path) -> None:
    """All trials side by side: id, how each ended and why, steps, best metric, the searched values."""
    params = sorted({k for t in trials for k in t.params})
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial_id", "ended", "steps", f"best_{metric}", "seed", "message", *params])
        for t in trials:
            writer.writerow([t.trial_id, t.status, t.steps, t.best, t.seed, t.message,
                             *(t.params.get(p) for p in params)])


def describe(trials: list[TrialOutcome], best: TrialOutcome | None, metric: str) -> str:
    """The parent run's description: how the trials ended, and the best one."""
    counts = Counter(t.status for t in trials)
    ended = ", ".join(f"{n} {status}" for status, n in counts.most_common())
    if best is None:
        return f"{len(trials)} trials ({ended}); none completed with a checkpoint, so no best model."
    values = ", ".join(f"{k}={v}" for k, v in best.params.items())
    return (f"Best: trial {best.trial_id} ({values}), {metric} {best.best:.4f}; weights in best/. "
            f"{len(trials)} trials ({ended}).")


@dataclass
class Published:
    """Where a search's best model went: its MLflow model, and its registered version if any."""

    model_uri: str  # models:/<model_id>
    version_uri: str | None  # models:/<name>/<version>
    registry: str  # what the registry did, in one line

    def lines(self) -> list[str]:
        version = f"; registered as {self.version_uri}" if self.version_uri else ""
        return [f"MLflow model: {self.model_uri}{version} (load with mlflow.pyfunc.load_model, or "
                "--model for predict and evaluate)", self.registry]


def log_search_result(client: MlflowClient, tracking_uri: str, parent_run_id: str,
                      trials: list[TrialOutcome], best: TrialOutcome | None, best_dir: Path | None,
                      cache_path: Path | None, metric: str, *, mode: str,
                      registered_model: str) -> Published | None:
    """The parent run's end: trials table, best config, its weights, model, plots and metrics; the
    model as an MLflow model, registered as a version of `registered_model` (none where it is empty).
    `best_dir` is the best trial's checkpoint as a local folder, `cache_path` the cache of its data."""
    import mlflow
    import yaml

    from ich_tune import mlflow_model, registry
    from ich_tune.checkpoint import load_checkpoint, save_checkpoint
    from ich_tune.config import build_experiment

    client.set_tag(parent_run_id, TAG_DESCRIPTION, describe(trials, best, metric))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if trials:
            write_trials_csv(trials, metric, folder / "trials.csv")
            client.log_artifact(parent_run_id, str(folder / "trials.csv"))
        if best is None:
            client.set_terminated(parent_run_id, RunStatus.to_string(RunStatus.FAILED))
            return None
        saved = load_checkpoint(best_dir / CHECKPOINT_FILE)  # best's checkpoint, a local folder
        model, state = saved.build(), saved.training
        config = build_experiment(best.config, {})
        save_checkpoint(folder / "weights.pt", config, model)
        (folder / "config.yaml").write_text(yaml.safe_dump(best.config, sort_keys=False))
        write_plots(best_dir, best.history, cache_path, config, folder)
        for name in ("weights.pt", "config.yaml", "examples.png", "roc.png", "curves.png"):
            client.log_artifact(parent_run_id, str(folder / name), "best")
        params = [Param(k, str(v)[:6000]) for k, v in flatten(best.config).items()]
        metrics = {f"best_{k}": v for k, v in numeric(state["history"][-1]).items()}
        now = int(time.time() * 1000)
        client.log_batch(parent_run_id, params=params[:100], tags=[
            RunTag("ich_tune.best_trial", best.trial_id), RunTag("ich_tune.best_checkpoint",
                                                                 checkpoint_uri(best.checkpoint))],
            metrics=[Metric(k, v, now, int(state["step"])) for k, v in metrics.items()])
        for start in range(100, len(params), 100):
            client.log_batch(parent_run_id, params=params[start:start + 100])
        mlflow.set_tracking_uri(tracking_uri)
        with mlflow.start_run(run_id=parent_run_id):  # ends the parent run FINISHED
            info = mlflow_model.log_model(folder / "weights.pt")
    if not registered_model:
        return Published(info.model_uri, None, "model registry: not registered (no registered_model name)")
    measured = registry.Measured(metric, mode, best.best, registry.data_fingerprint(cache_path, config.data))
    version_uri, said = registry.register(client, registered_model, info.model_id, parent_run_id, measured)
    return Published(info.model_uri, version_uri, said)
