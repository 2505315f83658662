"""What mattered in a search: the share of the spread of its trials' best metric that each searched key
explains, by fANOVA (Optuna's implementation), for the end of a search, its parent run and `report`.

The trials go into an in-memory Optuna study whose distributions are the search's own dimensions, so
fANOVA weighs each key over the space that was searched, whichever algorithm picked the trials. Only
trials that ran as far as the search let them (finished or stopped early) with a finite metric count.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.importance import FanovaImportanceEvaluator, get_param_importances
from optuna.trial import create_trial

from ich_tune.config.markers import INTEGER_RANGES, LISTS, Dimension
from ich_tune.evaluation.plots import importance_bars
from ich_tune.trials import COMPLETED, TrialOutcome

MIN_TRIALS = 5  # fewer, and fANOVA's forest fits noise
SEED = 0  # the forest's: the same trials give the same numbers
ARTIFACT, CHART = "importance.json", "importance.png"  # on a search's parent run


@dataclass
class Importance:
    """Each searched key's share of the metric's variance (largest first, summing to 1), or, where
    there is nothing to say, why."""

    metric: str
    trials: int  # finished trials with a finite metric
    shares: dict[str, float]
    note: str = ""  # why `shares` is empty

    def line(self) -> str:
        """e.g. "what mattered: optimizer.lr 0.71, model.dropout 0.29 (...)"."""
        if not self.shares:
            return f"what mattered: {self.note}"
        shares = ", ".join(f"{key} {share:.2f}" for key, share in self.shares.items())
        return f"what mattered: {shares} (fANOVA: share of {self.metric}'s variance over {self.trials} " \
               "finished trials)"


def what_mattered(trials: list[TrialOutcome], dimensions: list[Dimension], metric: str,
                  mode: str) -> Importance:
    """fANOVA importances of the searched keys over the trials that finished or were stopped early
    with a finite metric; with fewer than MIN_TRIALS of them or a single key, a note instead."""
    finished = [t for t in trials if t.status in COMPLETED and math.isfinite(t.best)
                and all(t.params.get(d.path) is not None for d in dimensions)]
    if len(dimensions) < 2:
        what = f"one searched key ({dimensions[0].path})" if dimensions else "no searched keys"
        return Importance(metric, len(finished), {}, f"{what}, nothing to rank")
    if len(finished) < MIN_TRIALS:
        return Importance(metric, len(finished), {}, f"{len(finished)} finished trials with a finite "
                          f"{metric}, too few to say (fANOVA needs {MIN_TRIALS})")
    if len({t.best for t in finished}) == 1:
        return Importance(metric, len(finished), {}, f"every finished trial reached {metric} "
                          f"{finished[0].best:.4f}, nothing to explain")
    finished.sort(key=lambda t: t.trial_id)  # the forest's fit depends on the order of its rows and columns
    dimensions = sorted(dimensions, key=lambda d: d.path)
    values = [{d.path: _value(d, t.params[d.path]) for d in dimensions} for t in finished]
    distributions = {d.path: _distribution(d, [v[d.path] for v in values]) for d in dimensions}
    study = _quiet_study("maximize" if mode == "max" else "minimize")
    study.add_trials([create_trial(params=v, distributions=distributions, value=t.best)
                      for v, t in zip(values, finished, strict=True)])
    shares = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=SEED))
    return Importance(metric, len(finished), {key: float(share) for key, share in shares.items()})


def log_importance(client: MlflowClient, run_id: str, importance: Importance) -> None:
    """The importances (or why there are none) as importance.json, and as a bar chart, on the run."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        record = {"method": "fANOVA (optuna.importance.FanovaImportanceEvaluator)", "seed": SEED,
                  "metric": importance.metric, "finished_trials": importance.trials,
                  "importances": importance.shares, "note": importance.note}
        (folder / ARTIFACT).write_text(json.dumps(record, indent=1) + "\n")
        client.log_artifact(run_id, str(folder / ARTIFACT))
        if importance.shares:
            title = f"what mattered for {importance.metric} ({importance.trials} finished trials)"
            (folder / CHART).write_bytes(importance_bars(importance.shares, title))
            client.log_artifact(run_id, str(folder / CHART))


def _value(dimension: Dimension, value: object) -> object:
    """A trial's value as its distribution holds it: list values as their text (which is also how
    MLflow keeps every param, so `report` reads the same values back), ranges as numbers."""
    if dimension.kind in LISTS:
        return str(value)
    return int(float(value)) if dimension.kind in INTEGER_RANGES else float(value)


def _distribution(dimension: Dimension, values: list) -> BaseDistribution:
    """The dimension as Optuna's distribution: grid_search and choice categorical, ranges numeric
    (log scale for log ones), their bounds widened to any value a trial got outside them (rounding
    to q may step out; randn has no bounds)."""
    if dimension.kind in LISTS:
        return CategoricalDistribution(list(dict.fromkeys([*map(str, dimension.args), *values])))
    bounds = [*dimension.candidates(), *values]
    log = "log" in dimension.kind
    if dimension.kind in INTEGER_RANGES:
        return IntDistribution(int(min(bounds)), int(max(bounds)), log=log)
    return FloatDistribution(float(min(bounds)), float(max(bounds)), log=log)


def _quiet_study(direction: str) -> optuna.Study:
    """An in-memory study, without Optuna's "A new study created" line on stderr."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.create_study(direction=direction)
    finally:
        optuna.logging.set_verbosity(verbosity)
