"""The Tune callback that records a search in MLflow: one nested child run per trial.

Only the driver talks to MLflow (a Tune callback), so it works the same on a multi-node cluster.
MLflow itself is the source of truth for what was already logged: on resume, each trial's child run
is found by the trial id, so nothing is created twice and replayed steps are not logged twice.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient
from ray import tune

from ich_tune.tracking.records import config_params, flatten, numeric
from ich_tune.tracking.tags import (
    TAG_ENDED,
    TAG_MESSAGE,
    TAG_NODE,
    TAG_PARENT,
    TAG_RESTARTS,
    TAG_TRIAL_ID,
)
from ich_tune.training.checkpoint import EXAMPLES_FILE
from ich_tune.trials import (
    COMPLETED,
    ENDED_KEY,
    ERROR,
    MESSAGE_KEY,
    NODE_KEY,
    TRIAL_LOG,
    how_it_ended,
    one_line,
)


def trial_run_name(config: dict, dimensions: list[str]) -> str:
    """A trial's run name: the values it was given, e.g. "lr=0.002 dropout=0.15", so MLflow's runs
    table reads without opening each run. Short names unless two dimensions end alike."""
    leaves = [path.rpartition(".")[2] for path in dimensions]
    names = leaves if len(set(leaves)) == len(leaves) else dimensions
    flat = flatten(config)
    return " ".join(f"{name}={flat.get(path)}" for name, path in zip(names, dimensions, strict=True))


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
        self.client.log_batch(run.info.run_id, params=config_params(trial.config))  # MLflow sends 100 a call
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
        self._log_output(run_id, trial)
        self.client.set_terminated(run_id, "FINISHED" if ended in COMPLETED else "FAILED")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A crashed trial that Ray restarts from its checkpoint: its run says so, and goes on."""
        self.client.log_batch(self.runs[trial.trial_id], tags=[
            RunTag(TAG_RESTARTS, str(trial.num_failures)), RunTag(TAG_MESSAGE, _last_error(trial))])

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self.runs[trial.trial_id]
        self.client.log_batch(run_id, tags=[RunTag(TAG_ENDED, ERROR),
                                            RunTag(TAG_MESSAGE, _last_error(trial))])
        self._log_output(run_id, trial)
        self.client.set_terminated(run_id, "FAILED")

    def _log_output(self, run_id: str, trial: Any) -> None:
        """The trial's own output (its trial.log) as an artifact of its run, where the trial trained on
        this node: its folder here, whatever the storage (a bucket's copy is Ray's to sync). A trial
        trained on another node keeps its log in its folder there and in the run folder."""
        output = Path(trial.local_path) / TRIAL_LOG
        if output.is_file():
            self.client.log_artifact(run_id, str(output))


def _last_error(trial: Any) -> str:
    """The trial's latest exception as one line (Ray keeps it in the trial's folder)."""
    error = trial.get_pickled_error() or trial.get_error()
    return one_line(error)[:5000] if error else "unknown error"
