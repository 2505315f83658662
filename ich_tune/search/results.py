"""What a finished (or stopped) search comes to: how each trial ended, and the best one."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ray.tune import ResultGrid
from ray.tune.utils import unflattened_lookup

from ich_tune.experiment import Search
from ich_tune.tracking.importance import Importance
from ich_tune.trials import ENDED_KEY, TrialOutcome, how_it_ended


@dataclass
class SearchOutcome:
    run_dir: str  # a local folder, or a URI
    parent_run_id: str
    tracking_uri: str
    trials: list[TrialOutcome]
    best: TrialOutcome | None
    importance: Importance  # what mattered, over the finished trials


def summarize(results: ResultGrid, search: Search, budget: int) -> list[TrialOutcome]:
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
        config = result.config or {}
        outcomes.append(TrialOutcome(
            trial_id=last.get("trial_id") or Path(result.path).name, status=status, steps=steps,
            best=float((max if mode == "max" else min)(values)) if values else float("nan"),
            params={d.path: unflattened_lookup(d.path, config, delimiter=".", default=None)
                    for d in search.dimensions},
            message=message, seed=last.get("seed"), config=result.config, history=validations,
            checkpoint=checkpoint))
    return outcomes
