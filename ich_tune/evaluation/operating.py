"""Operating points: the threshold at which a model says "bleed", chosen on validation and reported on
test. Two rules: the highest threshold that still finds a target share of the bleeds (a triage tool
that must not miss), and Youden's J (sensitivity + specificity - 1 at its largest)."""

from __future__ import annotations

import math

import numpy as np

TARGET_SENSITIVITY = 0.95


def threshold_for_sensitivity(scores: np.ndarray, positive: np.ndarray, target: float) -> float:
    """The highest threshold t with sensitivity(score >= t) >= target; NaN without positives."""
    found = np.sort(np.asarray(scores, dtype=np.float64)[np.asarray(positive, dtype=bool)])[::-1]
    if found.size == 0:
        return math.nan
    return float(found[max(0, math.ceil(target * found.size) - 1)])


def youden_threshold(scores: np.ndarray, positive: np.ndarray) -> float:
    """The threshold t maximising sensitivity + specificity - 1 for `score >= t` (the highest such t on a
    tie); NaN unless both labels are present."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        return math.nan
    candidates = np.unique(scores)[::-1]  # high to low: the first best is the highest threshold
    positives, negatives = np.sort(scores[positive]), np.sort(scores[~positive])
    sensitivity = 1.0 - np.searchsorted(positives, candidates, side="left") / positives.size
    specificity = np.searchsorted(negatives, candidates, side="left") / negatives.size
    return float(candidates[int(np.argmax(sensitivity + specificity))])


def rates_at(probs: np.ndarray, labels: np.ndarray, thresholds: np.ndarray) -> dict[str, np.ndarray]:
    """Per class: sensitivity and specificity of `probs >= threshold` (NaN where undefined)."""
    predicted = np.asarray(probs) >= np.asarray(thresholds)[None, :]
    positive = np.asarray(labels) == 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"sensitivity": (predicted & positive).sum(0) / positive.sum(0),
                "specificity": (~predicted & ~positive).sum(0) / (~positive).sum(0)}
