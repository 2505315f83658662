"""Which trials are truly tied with the best: a paired patient-level bootstrap of the difference in
the search's metric, every model resampled on the same patients, so that the noise the models share
(which patients happen to be in the validation set) cancels out of the difference."""

from __future__ import annotations

import numpy as np

from ich_tune.evaluation import bootstrap
from ich_tune.evaluation.metrics import compute_metrics

TIED, WORSE, BETTER = "tied", "worse", "better"


def compare_with_best(best: np.ndarray, others: dict[str, np.ndarray], labels: np.ndarray, groups: np.ndarray,
                      metric: str, mode: str, resamples: int = bootstrap.RESAMPLES,
                      seed: int = 0) -> dict[str, tuple[float, tuple[float, float], str]]:
    """For each other model (its probabilities on the same slices): the difference of `metric` (other -
    best), its 95% interval, and whether it is tied (the interval holds 0), worse or better."""
    codes, counts = bootstrap.patient_counts(groups, resamples, seed)

    def measured(probs: np.ndarray) -> np.ndarray:
        return bootstrap.resampled_metrics(probs, labels, codes, counts)[metric]

    reference, whole = measured(best), compute_metrics(best, labels)[metric]
    sign = 1.0 if mode == "max" else -1.0
    verdicts = {}
    for name, probs in others.items():
        low, high = bootstrap.intervals({metric: measured(probs) - reference})[metric]
        value = compute_metrics(probs, labels)[metric] - whole
        better, worse = sign * low > 0, sign * high < 0
        verdicts[name] = (float(value), (low, high), BETTER if better else WORSE if worse else TIED)
    return verdicts
