"""`ich_tune report NAME`: a search's trials and best config, read back from MLflow.

MLflow is the record a search leaves behind (Ray's trial folders may sit on another machine or be
gone), so everything here comes from the search's parent run and its child runs: their params,
metric histories and tags, and what mattered is computed from them again.
"""

from __future__ import annotations

import csv
import math
import tempfile
from pathlib import Path

import yaml
from mlflow.exceptions import MlflowException

from ich_tune.config.markers import find_dimensions
from ich_tune.errors import UserError
from ich_tune.evaluation.metrics import mode_of
from ich_tune.tracking.client import (
    child_runs,
    has_artifact,
    mlflow_client,
    search_experiment,
    tracking_errors,
    ui_hint,
)
from ich_tune.tracking.importance import what_mattered
from ich_tune.tracking.references import CONFIG_ARTIFACT, RESOLVED_ARTIFACT
from ich_tune.tracking.tags import (
    TAG_BEST_TRIAL,
    TAG_ENDED,
    TAG_MESSAGE,
    TAG_METRIC,
    TAG_MODE,
    TAG_SEARCH_DIR,
    TAG_TRIAL_ID,
)
from ich_tune.trials import TrialOutcome, table

DEFAULT_METRIC = "val_accuracy"


def search_report(name: str, sort: str | None = None, tracking_uri: str | None = None,
                  run_id: str | None = None) -> str:
    """The trials table of search `name` (its latest parent run, or `run_id`) and its best config."""
    with tracking_errors():
        return _report(name, sort, tracking_uri, run_id)


def _report(name: str, sort: str | None, tracking_uri: str | None, run_id: str | None) -> str:
    client, uri = mlflow_client(tracking_uri)
    experiment = search_experiment(client, uri, name, f"no search named '{name}'")
    parent = _parent_run(client, experiment.experiment_id, name, run_id)
    parent_id = parent.info.run_id
    children = child_runs(client, parent_id)
    if not children:
        return f"search '{name}', run {parent_id} ({parent.info.status.lower()}): no trials recorded yet."
    metric = sort or _search_metric(client, parent)
    available = sorted({key for run in children for key in run.data.metrics})
    if sort and metric not in available:  # the search's own metric may be missing: all diverged, say
        raise UserError(f"--sort {metric}: no trial of search '{name}' logged it; sort by one of "
                        f"{', '.join(available)}.")
    mode = parent.data.tags.get(TAG_MODE) if metric == parent.data.tags.get(TAG_METRIC) else None
    mode = mode or mode_of(metric)
    trials = [_trial(client, run, metric, mode) for run in children]
    mattered = _what_mattered(client, parent, trials, metric, mode)
    keys = {key for t in trials for key in t.params}
    searched = {k for k in keys if len({t.params.get(k) for t in trials}) > 1}  # what the search varied
    for t in trials:
        t.params = {k: v for k, v in t.params.items() if k in searched}
    order = "lower" if mode == "min" else "higher"
    lines = [f"search '{name}', run {parent_id} ({parent.info.run_name}, {parent.info.status.lower()}): "
             f"{len(trials)} trials, sorted by best {metric} ({order} is better)", "",
             table(trials, metric, mode), "", mattered, "", _best_config(client, parent), "",
             f"compare trials: {ui_hint(uri, experiment.experiment_id)}"]
    return "\n".join(lines)


def _parent_run(client, experiment_id: str, name: str, run_id: str | None):
    """The search's parent run: `run_id`, or the latest one recorded under `name`."""
    if run_id is None:
        runs = client.search_runs([experiment_id], f"tags.`{TAG_SEARCH_DIR}` LIKE '%'", max_results=1,
                                  order_by=["attributes.start_time DESC"])
        if not runs:
            raise UserError(f"search '{name}': no search run recorded in its MLflow experiment.")
        return runs[0]
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise UserError(f"--run {run_id}: no such MLflow run.") from None
    if run.info.experiment_id != experiment_id or TAG_SEARCH_DIR not in run.data.tags:
        raise UserError(f"--run {run_id}: not a search run of '{name}' (give the parent run id that "
                        "`ich_tune run` printed).")
    return run


def _search_metric(client, parent) -> str:
    """The metric the search optimised: its tag, else the header of its trials.csv, else val_accuracy."""
    if TAG_METRIC in parent.data.tags:
        return parent.data.tags[TAG_METRIC]
    if has_artifact(client, parent.info.run_id, "trials.csv"):
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(parent.info.run_id, "trials.csv", tmp)
            with open(path, newline="") as f:
                header = next(csv.reader(f), [])
        for column in header:
            if column.startswith("best_"):  # tracking.write_trials_csv names it best_<metric>
                return column.removeprefix("best_")
    return DEFAULT_METRIC


def _trial(client, run, metric: str, mode: str) -> TrialOutcome:
    values = [m.value for m in client.get_metric_history(run.info.run_id, metric) if math.isfinite(m.value)]
    tags, status = run.data.tags, run.info.status
    return TrialOutcome(
        trial_id=tags.get(TAG_TRIAL_ID, run.info.run_name), status=tags.get(TAG_ENDED, status.lower()),
        steps=int(run.data.metrics.get("step", 0)),
        best=(max if mode == "max" else min)(values) if values else math.nan,
        params=dict(run.data.params),
        message=tags.get(TAG_MESSAGE, "") if status == "FAILED" else "")  # else a crash it recovered from


def _what_mattered(client, parent, trials: list[TrialOutcome], metric: str, mode: str) -> str:
    """The importance line, over the dimensions of the search's resolved file as it ran."""
    run_id = parent.info.run_id
    if not has_artifact(client, run_id, RESOLVED_ARTIFACT):
        return f"what mattered: unknown (no {RESOLVED_ARTIFACT} in run {run_id}, so no searched dimensions)"
    with tempfile.TemporaryDirectory() as tmp:
        resolved = yaml.safe_load(Path(client.download_artifacts(run_id, RESOLVED_ARTIFACT, tmp)).read_text())
    dimensions = find_dimensions(resolved.get("experiment", {}), {})
    return what_mattered(trials, dimensions, metric, mode).line()


def _best_config(client, parent) -> str:
    run_id = parent.info.run_id
    if not has_artifact(client, run_id, CONFIG_ARTIFACT):
        return (f"no {CONFIG_ARTIFACT} in run {run_id}: the search has not finished, or no trial "
                "reported its metric.")
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(client.download_artifacts(run_id, CONFIG_ARTIFACT, tmp)).read_text()
    trial = parent.data.tags.get(TAG_BEST_TRIAL, "?")
    return f"# best config (trial {trial}; {CONFIG_ARTIFACT} of run {run_id})\n{text.rstrip()}"
