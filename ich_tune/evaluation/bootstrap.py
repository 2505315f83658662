"""Confidence intervals for the validation metrics, by resampling patients rather than slices.

Slices of one patient are near-duplicates, so resampling slices would treat 40 views of one head as
40 independent cases and give intervals that are too narrow. A resample draws P patients with
replacement from the P in the set; a patient drawn twice counts twice. Every metric is a ratio of
per-patient sums (AUC: of per-patient-pair sums), so a resample's value is a weighted sum over
patients: the draws of all resamples form a count matrix C [resamples, patients] and each metric
for all resamples is one matrix product, not a Python loop.
"""

from __future__ import annotations

import numpy as np

from ich_tune.data.labels import CLASSES
from ich_tune.evaluation.metrics import ANY, COMPETITION_WEIGHTS, PROB_CLIP, THRESHOLD

RESAMPLES = 1000
LEVEL = 0.95


def patient_counts(groups: np.ndarray, resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each slice's patient as a code 0..P-1, and how often each resample draws each patient."""
    _, codes = np.unique(np.asarray(groups), return_inverse=True)
    patients = int(codes.max()) + 1
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(patients, np.full(patients, 1.0 / patients), size=resamples)
    return codes, draws.astype(np.float64)


def bootstrap_metrics(probs: np.ndarray, labels: np.ndarray, groups: np.ndarray,
                      resamples: int = RESAMPLES, seed: int = 0) -> dict[str, np.ndarray]:
    """The value of each metric of `compute_metrics` in every resample ([resamples] each; NaN where a
    resample has no positives or no negatives of a class). `groups` names each slice's patient; give
    each slice its own group for a slice-level bootstrap."""
    codes, counts = patient_counts(groups, resamples, seed)
    return resampled_metrics(probs, labels, codes, counts)


def resampled_metrics(probs: np.ndarray, labels: np.ndarray, codes: np.ndarray,
                      counts: np.ndarray) -> dict[str, np.ndarray]:
    """The metrics of each resample, given each slice's patient code and each resample's draws."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels) == 1

    def per_patient(values: np.ndarray) -> np.ndarray:
        return resampled_sums(values, codes, counts)

    predicted = probs >= THRESHOLD
    slices = per_patient(np.ones(len(probs)))
    with np.errstate(invalid="ignore", divide="ignore"):
        class_accuracy = per_patient((predicted == labels).astype(float)) / slices[:, None]
        class_baseline = 1.0 - per_patient(labels.astype(float)) / slices[:, None]
        clipped = np.clip(probs, PROB_CLIP, 1.0 - PROB_CLIP)
        bce = -(labels * np.log(clipped) + ~labels * np.log(1.0 - clipped))
        values = {
            "accuracy": class_accuracy.mean(axis=1),
            "accuracy_baseline": class_baseline.mean(axis=1),
            "accuracy_any": class_accuracy[:, ANY],
            "accuracy_any_baseline": class_baseline[:, ANY],
            "log_loss": per_patient(bce @ COMPETITION_WEIGHTS / COMPETITION_WEIGHTS.sum()) / slices,
        }
        for name in ("accuracy", "accuracy_any"):
            baseline = values[f"{name}_baseline"]
            relative = (values[name] - baseline) / (1.0 - baseline)
            values[f"{name}_relative"] = np.where(baseline < 1.0, relative, np.nan)
        positives, negatives = per_patient(labels.astype(float)), per_patient((~labels).astype(float))
        hits = per_patient((predicted & labels).astype(float))
        rejections = per_patient((~predicted & ~labels).astype(float))
        aucs = np.stack([_auc(probs[:, k], labels[:, k], codes, counts) for k in range(len(CLASSES))], axis=1)
        for k, name in enumerate(CLASSES):
            values[f"auc_{name}"] = aucs[:, k]
            values[f"sensitivity_{name}"] = hits[:, k] / positives[:, k]
            values[f"specificity_{name}"] = rejections[:, k] / negatives[:, k]
        defined = ~np.isnan(aucs)
        mean = np.nansum(aucs, axis=1) / defined.sum(axis=1)
        values["auc_mean"] = np.where(defined.any(axis=1), mean, np.nan)
    return values


def resampled_sums(values: np.ndarray, codes: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Sums of `values` over each patient's slices, then over each resample's draws: [resamples, ...]."""
    summed = np.zeros((counts.shape[1], *values.shape[1:]))
    np.add.at(summed, codes, values)
    return counts @ summed


def resampled_rates(probs: np.ndarray, labels: np.ndarray, thresholds: np.ndarray, codes: np.ndarray,
                    counts: np.ndarray) -> dict[str, np.ndarray]:
    """Sensitivity and specificity of `probs >= thresholds` (one per class) in every resample:
    [resamples, classes] each."""
    predicted = np.asarray(probs) >= np.asarray(thresholds)[None, :]
    positive = np.asarray(labels) == 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"sensitivity": resampled_sums((predicted & positive).astype(float), codes, counts)
                / resampled_sums(positive.astype(float), codes, counts),
                "specificity": resampled_sums((~predicted & ~positive).astype(float), codes, counts)
                / resampled_sums((~positive).astype(float), codes, counts)}


def _auc(scores: np.ndarray, positive: np.ndarray, codes: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """AUC of one class in every resample.

    The Mann-Whitney numerator is a sum over (positive slice, negative slice) pairs, so with patient
    weights c it is c^T M c, where M[p, q] counts the pairs (a positive of p, a negative of q) that the
    positive wins, ties counting half; M is built once for all resamples.
    """
    patients = counts.shape[1]
    order = np.argsort(scores[~positive], kind="stable")
    negative_scores, negative_codes = scores[~positive][order], codes[~positive][order]
    owners, won = codes[positive], scores[positive]
    below, upto = (_pairs_before(np.searchsorted(negative_scores, won, side=side), owners, negative_codes,
                                 patients) for side in ("left", "right"))
    wins = 0.5 * (below + upto)  # strictly below, plus half of the ties
    pairs = (counts @ np.bincount(owners, minlength=patients)) * \
        (counts @ np.bincount(negative_codes, minlength=patients))
    numerator = np.einsum("bp,pq,bq->b", counts, wins, counts, optimize=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, numerator / pairs, np.nan)


def _pairs_before(ends: np.ndarray, owners: np.ndarray, codes: np.ndarray, patients: int) -> np.ndarray:
    """[P, P]: for each i, add the patient histogram of codes[:ends[i]] to row owners[i].

    The codes are cut into blocks of about sqrt(n): the histograms of whole blocks before each end are
    cumulated once and summed by one matrix product, and only the part of the last block is counted
    pair by pair, so the work is about n * sqrt(n), without a Python loop.
    """
    n = len(codes)
    size = max(1, int(np.sqrt(n)))
    blocks = n // size + 1
    per_block = np.bincount(np.arange(n) // size * patients + codes,
                            minlength=blocks * patients).reshape(blocks, patients)
    before_block = np.cumsum(per_block, axis=0) - per_block
    whole = np.bincount(owners * blocks + ends // size, minlength=patients * blocks).reshape(patients, blocks)
    starts = ends // size * size
    lengths = ends - starts
    offsets = np.cumsum(lengths) - lengths
    rest = np.arange(lengths.sum()) + np.repeat(starts - offsets, lengths)
    partial = np.bincount(np.repeat(owners, lengths) * patients + codes[rest], minlength=patients * patients)
    return whole.astype(np.float64) @ before_block.astype(np.float64) + partial.reshape(patients, patients)


def intervals(values: dict[str, np.ndarray], level: float = LEVEL) -> dict[str, tuple[float, float]]:
    """The percentile interval of each metric over the resamples that define it."""
    tail = 50.0 * (1.0 - level)
    bounds = {}
    for name, samples in values.items():
        defined = samples[~np.isnan(samples)]
        low, high = np.percentile(defined, [tail, 100.0 - tail]) if defined.size else (np.nan, np.nan)
        bounds[name] = (float(low), float(high))
    return bounds


def roc_bands(probs: np.ndarray, labels: np.ndarray, groups: np.ndarray, grid: np.ndarray,
              resamples: int = 200, seed: int = 0, level: float = LEVEL) -> dict[str, np.ndarray]:
    """Per class, the percentile band of the true positive rate at each false positive rate of `grid`
    over patient-level resamples: {"grid": grid, "low": [classes, len(grid)], "high": ...} (NaN for a
    class that no resample can measure)."""
    probs, positive = np.asarray(probs, dtype=np.float64), np.asarray(labels) == 1
    codes, counts = patient_counts(groups, resamples, seed)
    tail = 50.0 * (1.0 - level)
    low, high = np.full((probs.shape[1], len(grid)), np.nan), np.full((probs.shape[1], len(grid)), np.nan)
    for k in range(probs.shape[1]):
        order = np.argsort(-probs[:, k], kind="stable")
        ends = np.flatnonzero(np.diff(probs[order, k], append=-np.inf))  # the last slice of each tied score
        weights = counts[:, codes[order]]
        hits = np.cumsum(weights * positive[order, k], axis=1)[:, ends]
        alarms = np.cumsum(weights * ~positive[order, k], axis=1)[:, ends]
        measurable = (hits[:, -1] > 0) & (alarms[:, -1] > 0)
        if not measurable.any():
            continue
        curves = [np.interp(grid, np.r_[0.0, a / a[-1]], np.r_[0.0, h / h[-1]])
                  for h, a in zip(hits[measurable], alarms[measurable], strict=True)]
        low[k], high[k] = np.percentile(curves, [tail, 100.0 - tail], axis=0)
    return {"grid": np.asarray(grid), "low": low, "high": high}
