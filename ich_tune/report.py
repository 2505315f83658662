"""`ich_tune report NAME`: a search's trials and best config, read back from MLflow.

MLflow is the record a search leaves behind (Ray's trial folders may sit on another machine or be
gone), so everything here comes from the search's parent run and its child runs: their params,
metric histories and tags.
"""

from __future__ import annotations

import csv
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ich_tune.errors import UserError
from ich_tune.tracking import TAG_METRIC, TAG_SEARCH_DIR, TAG_STOPPED_EARLY, TAG_TRIAL_ID, child_runs
from ich_tune.weights import CONFIG_ARTIFACT, known_searches, mlflow_client, tracking_errors

DEFAULT_METRIC = "val_accuracy"


@dataclass
class Trial:
    trial_id: str
    params: dict[str, str]  # flattened experiment keys, as logged
    steps: int
    best: float  # of the chosen metric over the trial's history; NaN if never logged
    ended: str


def ascending(metric: str) -> bool:
    """Losses are better low; every other metric we log (accuracy, AUC, ...) is better high."""
    return "loss" in metric


def search_report(name: str, sort: str | None = None, tracking_uri: str | None = None,
                  run_id: str | None = None) -> str:
    """The trials table of search `name` (its latest parent run, or `run_id`) and its best config."""
    with tracking_errors():
        return _report(name, sort, tracking_uri, run_id)


def _report(name: str, sort: str | None, tracking_uri: str | None, run_id: str | None) -> str:
    client, uri = mlflow_client(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        raise UserError(f"no search named '{name}' in {uri} (known: {known_searches(client)}); "
                        "pass --tracking-uri if it was recorded elsewhere.")
    parent = _parent_run(client, experiment.experiment_id, name, run_id)
    parent_id = parent.info.run_id
    children = child_runs(client, parent_id)
    if not children:
        return f"search '{name}', run {parent_id} ({parent.info.status.lower()}): no trials recorded yet."
    metric = sort or _search_metric(client, parent)
    available = sorted({key for run in children for key in run.data.metrics})
    if metric not in available:
        what = f"--sort {metric}" if sort else f"{metric} (the search's metric)"
        raise UserError(f"{what}: no trial of search '{name}' logged it; sort by one of "
                        f"{', '.join(available)}.")
    trials = [_trial(client, run, metric) for run in children]
    trials.sort(key=lambda t: (math.isnan(t.best), t.best if ascending(metric) else -t.best))
    order = "lower" if ascending(metric) else "higher"
    lines = [f"search '{name}', run {parent_id} ({parent.info.run_name}, {parent.info.status.lower()}): "
             f"{len(trials)} trials, sorted by best {metric} ({order} is better)", "",
             _table(trials, metric), "", _best_config(client, parent), "",
             f"compare trials: mlflow ui --backend-store-uri {uri}"]
    return "\n".join(lines)


def _parent_run(client, experiment_id: str, name: str, run_id: str | None):
    """The search's parent run: `run_id`, or the latest one recorded under `name`."""
    if run_id is None:
        runs = client.search_runs([experiment_id], f"tags.`{TAG_SEARCH_DIR}` LIKE '%'", max_results=1,
                                  order_by=["attributes.start_time DESC"])
        if not runs:
            raise UserError(f"search '{name}': no search run recorded in its MLflow experiment.")
        return runs[0]
    from mlflow.exceptions import MlflowException

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
    if any(f.path == "trials.csv" for f in client.list_artifacts(parent.info.run_id)):
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(parent.info.run_id, "trials.csv", tmp)
            with open(path, newline="") as f:
                header = next(csv.reader(f), [])
        for column in header:
            if column.startswith("best_"):  # tracking.write_trials_csv names it best_<metric>
                return column.removeprefix("best_")
    return DEFAULT_METRIC


def _trial(client, run, metric: str) -> Trial:
    values = [m.value for m in client.get_metric_history(run.info.run_id, metric) if math.isfinite(m.value)]
    best = (min if ascending(metric) else max)(values) if values else math.nan
    status = run.info.status
    if status == "FINISHED":
        ended = "stopped early" if run.data.tags.get(TAG_STOPPED_EARLY) == "true" else "finished"
    else:
        ended = {"FAILED": "failed", "RUNNING": "running"}.get(status, status.lower())
    return Trial(trial_id=run.data.tags.get(TAG_TRIAL_ID, run.info.run_name), params=run.data.params,
                 steps=int(run.data.metrics.get("step", 0)), best=best, ended=ended)


def _table(trials: list[Trial], metric: str) -> str:
    """Aligned columns: trial, the params that differ between trials, steps, best metric, ended."""
    keys = sorted({key for t in trials for key in t.params})
    searched = [k for k in keys if len({t.params.get(k) for t in trials}) > 1]
    header = ["trial", *searched, "steps", f"best {metric}", "ended"]
    rows = [[t.trial_id, *(t.params.get(k, "-") for k in searched), str(t.steps),
             "-" if math.isnan(t.best) else f"{t.best:.4f}", t.ended] for t in trials]
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                     for row in [header, *rows])


def _best_config(client, parent) -> str:
    run_id = parent.info.run_id
    if not any(f.path == CONFIG_ARTIFACT for f in client.list_artifacts(run_id, "best")):
        return (f"no {CONFIG_ARTIFACT} in run {run_id}: the search has not finished, or no trial "
                "reported its metric.")
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(client.download_artifacts(run_id, CONFIG_ARTIFACT, tmp)).read_text()
    trial = parent.data.tags.get("ich_tune.best_trial", "?")
    return f"# best config (trial {trial}; {CONFIG_ARTIFACT} of run {run_id})\n{text.rstrip()}"
