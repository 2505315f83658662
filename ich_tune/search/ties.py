"""Which of the top trials are statistically tied with the best: their best checkpoints' validation
predictions (saved with each checkpoint) compared with the best's by a paired patient bootstrap."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np

from ich_tune.data.cache import open_cache
from ich_tune.data.split import patient_groups
from ich_tune.evaluation.ties import compare_with_best
from ich_tune.training.checkpoint import VALIDATION_FILE
from ich_tune.trials import COMPLETED, TrialOutcome, ranked

log = logging.getLogger(__name__)
TOP = 5  # the best and the next four by the search metric


def mark_ties(trials: list[TrialOutcome], best: TrialOutcome, metric: str, mode: str, cache_path: Path,
              top: int = TOP) -> str:
    """Set `versus_best` on the top trials that validated on the best's slices; one line saying how
    many are tied. `metric` is the search's (val_ prefix and all)."""
    name = metric.removeprefix("val_")
    best_probs, labels, rows = _validation(best)
    others = {}
    for trial in ranked([t for t in trials if t.status in COMPLETED and t.checkpoint], mode)[:top]:
        if trial is best:
            continue
        probs, _, their_rows = _validation(trial)
        if np.array_equal(their_rows, rows):  # the same slices (a searched data setting may change them)
            others[trial.trial_id] = probs
    cache = open_cache(cache_path)
    groups = patient_groups(cache.patient_ids[rows], cache.study_uids[rows])
    try:
        verdicts = compare_with_best(best_probs, others, labels, groups, name, mode)
    except KeyError:
        return f"no tie analysis: {metric} is not a metric of the validation predictions"
    for trial in trials:
        if trial.trial_id in verdicts:
            trial.versus_best = verdicts[trial.trial_id][2]
    best.versus_best = "best"
    tied = sum(v[2] == "tied" for v in verdicts.values())
    return (f"statistically tied with the best: {tied} of the next {len(verdicts)} trials by {metric} "
            "(95% interval of the paired patient-bootstrap difference holds 0)")


def _validation(trial: TrialOutcome) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities, labels and cache rows of the validation saved with a trial's best checkpoint."""
    with trial.checkpoint.as_directory() if trial.checkpoint else contextlib.nullcontext() as folder:
        saved = np.load(Path(folder) / VALIDATION_FILE)
        return saved["probs"], saved["labels"], saved["indices"]
