"""The end of a search in MLflow: the parent run's trials table, what mattered, the best config,
weights, plots and metrics, the best model as an MLflow model, and its registered version."""

from __future__ import annotations

import csv
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import yaml
from mlflow.entities import Metric, RunStatus, RunTag
from mlflow.tracking import MlflowClient

from ich_tune.data.cache import open_cache
from ich_tune.data.fingerprint import data_fingerprint
from ich_tune.data.split import patient_groups
from ich_tune.evaluation.assess import Assessment, Calibration, assess, fit_calibration, html_page
from ich_tune.evaluation.bootstrap import roc_bands
from ich_tune.evaluation.plots import example_grid, reliability_diagram, roc_curves, training_curves
from ich_tune.experiment import build_experiment
from ich_tune.tracking import pyfunc, registry
from ich_tune.tracking.client import TRACKING_ENV, child_runs
from ich_tune.tracking.importance import Importance, log_importance
from ich_tune.tracking.records import config_params, numeric
from ich_tune.tracking.tags import (
    TAG_BEST_CHECKPOINT,
    TAG_BEST_TRIAL,
    TAG_DESCRIPTION,
    TAG_TRIAL_ID,
    TAG_VERSUS_BEST,
)
from ich_tune.training.checkpoint import CHECKPOINT_FILE, VALIDATION_FILE, load_checkpoint, save_checkpoint
from ich_tune.trials import TrialOutcome, checkpoint_uri

PLOTS = ("examples.png", "roc.png", "reliability.png", "curves.png")


def assess_validation(checkpoint_dir: Path, cache_path: Path, history: list[dict], config,
                      out: Path) -> tuple[Calibration, Assessment]:
    """The best model on its validation: temperatures and thresholds fitted there, every figure with its
    patient-level interval, the plots (example grid, ROC curves with their bands, reliability before and
    after scaling, training curves) and report.html written into `out`."""
    validation = np.load(checkpoint_dir / VALIDATION_FILE)
    probs, labels, indices = validation["probs"], validation["labels"], validation["indices"]
    cache = open_cache(cache_path)
    groups = patient_groups(cache.patient_ids[indices], cache.study_uids[indices])
    calibration = fit_calibration(probs, labels)
    assessment = assess(probs, labels, groups, "validation", calibration)
    scaled = calibration.apply(probs)
    figures = {
        "examples.png": example_grid(cache.rows(indices), labels, probs, config.logging.plot_examples,
                                     config.logging.plot_baseline, seed=config.seed),
        "roc.png": roc_curves(scaled, labels, roc_bands(scaled, labels, groups, np.linspace(0.0, 1.0, 101))),
        "reliability.png": reliability_diagram(probs, labels, scaled),
        "curves.png": training_curves(history),
    }
    for name, png in figures.items():
        (out / name).write_bytes(png)
    notes = ["The best trial's model on the validation split it was chosen on: its figures are biased "
             "upward by that choice (the winner's curse); temperatures and thresholds were fitted here."]
    (out / "report.html").write_text(html_page("best model of the search", assessment, figures, notes))
    return calibration, assessment


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
    validation: list[str]  # the best model's validation figures with their intervals

    def lines(self) -> list[str]:
        version = f"; registered as {self.version_uri}" if self.version_uri else ""
        return [*self.validation, f"MLflow model: {self.model_uri}{version} (load with "
                "mlflow.pyfunc.load_model, or --model for predict and evaluate)", self.registry]


def log_search_result(client: MlflowClient, tracking_uri: str, parent_run_id: str,
                      trials: list[TrialOutcome], best: TrialOutcome | None, best_dir: Path | None,
                      cache_path: Path | None, metric: str, *, mode: str, registered_model: str,
                      importance: Importance) -> Published | None:
    """The parent run's end: trials table, what mattered, best config, its weights, model, plots and
    metrics; the model as an MLflow model, registered as a version of `registered_model` (none where it
    is empty). `best_dir` is the best trial's checkpoint as a local folder, `cache_path` the cache of
    its data."""
    client.set_tag(parent_run_id, TAG_DESCRIPTION, describe(trials, best, metric))
    log_importance(client, parent_run_id, importance)
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
        calibration, assessment = assess_validation(best_dir, cache_path, best.history, config, folder)
        save_checkpoint(folder / "weights.pt", config, model, calibration=calibration.to_dict())
        (folder / "config.yaml").write_text(yaml.safe_dump(best.config, sort_keys=False))
        for name in ("weights.pt", "config.yaml", "report.html", *PLOTS):
            client.log_artifact(parent_run_id, str(folder / name), "best")
        metrics = {f"best_{k}": v for k, v in numeric(state["history"][-1]).items()}
        metrics |= {k: v for k, v in assessment.mlflow_metrics("best_val_").items() if k not in metrics}
        _tag_versus_best(client, parent_run_id, trials)
        now = int(time.time() * 1000)
        client.log_batch(parent_run_id, params=config_params(best.config), tags=[  # MLflow splits the batch
            RunTag(TAG_BEST_TRIAL, best.trial_id),
            RunTag(TAG_BEST_CHECKPOINT, checkpoint_uri(best.checkpoint))],
            metrics=[Metric(k, v, now, int(state["step"])) for k, v in metrics.items()])
        _set_global_tracking_uri(tracking_uri)
        with mlflow.start_run(run_id=parent_run_id):  # ends the parent run FINISHED
            info = pyfunc.log_model(folder / "weights.pt")
    if not registered_model:
        return Published(info.model_uri, None, "model registry: not registered (no registered_model name)",
                         assessment.lines())
    measured = registry.Measured(metric, mode, best.best, data_fingerprint(cache_path, config.data))
    version_uri, said = registry.register(client, registered_model, info.model_id, parent_run_id, measured)
    return Published(info.model_uri, version_uri, said, assessment.lines())


def _tag_versus_best(client: MlflowClient, parent_run_id: str, trials: list[TrialOutcome]) -> None:
    """Each compared trial's run says whether it is tied with the best."""
    verdicts = {t.trial_id: t.versus_best for t in trials if t.versus_best}
    for run in child_runs(client, parent_run_id) if verdicts else []:
        verdict = verdicts.get(run.data.tags.get(TAG_TRIAL_ID, ""))
        if verdict:
            client.set_tag(run.info.run_id, TAG_VERSUS_BEST, verdict)


def _set_global_tracking_uri(uri: str) -> None:
    """MLflow's global tracking URI, for its fluent API (start_run, log_model) and a SQL registry
    (registry.register). mlflow.set_tracking_uri also exports it as MLFLOW_TRACKING_URI, which the
    next verb in this process would take for the user's choice: the environment stays as it was."""
    before = os.environ.get(TRACKING_ENV)
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop(TRACKING_ENV, None)
    else:
        os.environ[TRACKING_ENV] = before
