"""Whether a probability of 0.8 means 8 in 10: expected calibration error, reliability bins, and
temperature scaling (one temperature per class, fitted on validation, never on test).

Dividing a class's logits by its temperature T changes no ranking (AUC, and any threshold moved to
match, are unchanged) but makes an over-confident model (T > 1) or a timid one (T < 1) honest, which
is what the competition's log loss and a radiologist reading the number care about.
"""

from __future__ import annotations

import numpy as np

from ich_tune.evaluation.metrics import PROB_CLIP

BINS = 15  # equal-width probability bins, the usual choice for ECE
LOG_T_RANGE = (-4.0, 4.0)  # temperatures from e^-4 to e^4


def logits_of(probs: np.ndarray) -> np.ndarray:
    """The logits behind probabilities, clipped as the log loss clips them."""
    p = np.clip(np.asarray(probs, dtype=np.float64), PROB_CLIP, 1.0 - PROB_CLIP)
    return np.log(p) - np.log1p(-p)


def apply_temperatures(probs: np.ndarray, temperatures: np.ndarray) -> np.ndarray:
    """Probabilities with each class's logits divided by its temperature."""
    return 1.0 / (1.0 + np.exp(-logits_of(probs) / np.asarray(temperatures, dtype=np.float64)))


def fit_temperatures(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per class, the temperature that minimises the binary log loss of these (validation) slices; 1.0
    for a class with only one label present, where there is nothing to fit."""
    # SciPy takes about half a second to import: only fitting pays it, not predict applying a calibration
    from scipy.optimize import minimize_scalar

    logits, labels = logits_of(probs), np.asarray(labels, dtype=np.float64)
    temperatures = np.ones(logits.shape[1])
    for k in range(logits.shape[1]):
        z, y = logits[:, k], labels[:, k]
        if y.min() == y.max():
            continue

        def loss(log_t: float, z=z, y=y) -> float:
            scaled = z / np.exp(log_t)
            return float(np.mean(np.logaddexp(0.0, scaled) - y * scaled))  # BCE with logits

        temperatures[k] = float(np.exp(minimize_scalar(loss, bounds=LOG_T_RANGE, method="bounded").x))
    return temperatures


def reliability(probs: np.ndarray, positive: np.ndarray, bins: int = BINS) -> dict[str, np.ndarray]:
    """Per equal-width bin of predicted probability: slices, mean prediction and observed rate."""
    probs, positive = np.asarray(probs, dtype=np.float64), np.asarray(positive, dtype=np.float64)
    which = np.minimum((probs * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        predicted = np.bincount(which, weights=probs, minlength=bins) / count
        observed = np.bincount(which, weights=positive, minlength=bins) / count
    return {"count": count, "predicted": predicted, "observed": observed}


def expected_calibration_error(probs: np.ndarray, positive: np.ndarray, bins: int = BINS) -> float:
    """Sum over bins of (share of slices) x |mean prediction - observed rate|."""
    table = reliability(probs, positive, bins)
    filled = table["count"] > 0
    share = table["count"][filled] / table["count"].sum()
    return float(np.sum(share * np.abs(table["predicted"][filled] - table["observed"][filled])))
