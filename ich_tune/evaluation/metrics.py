"""Validation metrics that cannot flatter a model: every accuracy comes with its all-negative baseline.

With RSNA's label rates a model that never sees a bleed already scores about 0.94 on the
original's averaged accuracy, so AUC and the competition's weighted log loss sit beside it.
"""

from __future__ import annotations

import math

import numpy as np

from ich_tune.data.labels import CLASSES

THRESHOLD = 0.5  # a probability >= THRESHOLD counts as a positive prediction (logit >= 0)
PROB_CLIP = 1e-7  # log loss clips predictions to [PROB_CLIP, 1 - PROB_CLIP]
ANY = CLASSES.index("any")
COMPETITION_WEIGHTS = np.array([2.0 if name == "any" else 1.0 for name in CLASSES])

NAN = math.nan
LOWER_IS_BETTER = ("log_loss",)  # every other metric here (accuracy, AUC, sensitivity, ...) is better high


def mode_of(metric: str) -> str:
    """"min" or "max": how to rank trials by a reported metric (`val_log_loss` -> "min")."""
    return "min" if metric.removeprefix("val_") in LOWER_IS_BETTER else "max"


def compute_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy (+ baseline, relative), per-class AUC, sensitivity, specificity, weighted log loss.

    `probs` and `labels` are [N, 6] in CLASSES order; labels are 0 or 1. Values that do not exist
    for this validation set (AUC of a class without positives, say) are NaN, never a made-up 0.5.
    """
    probs, labels = _checked(probs, labels)
    predicted = probs >= THRESHOLD
    positive = labels == 1
    correct = predicted == positive
    class_accuracy = correct.mean(axis=0)
    class_baseline = 1.0 - positive.mean(axis=0)  # accuracy of answering "no bleed" everywhere

    metrics = {
        "accuracy": float(class_accuracy.mean()),
        "accuracy_baseline": float(class_baseline.mean()),
        "accuracy_any": float(class_accuracy[ANY]),
        "accuracy_any_baseline": float(class_baseline[ANY]),
    }
    for name in ("accuracy", "accuracy_any"):
        metrics[f"{name}_relative"] = relative_accuracy(metrics[name], metrics[f"{name}_baseline"])

    aucs = [roc_auc(probs[:, k], positive[:, k]) for k in range(len(CLASSES))]
    defined = [auc for auc in aucs if not math.isnan(auc)]
    metrics.update({f"auc_{name}": auc for name, auc in zip(CLASSES, aucs, strict=True)})
    metrics["auc_mean"] = float(np.mean(defined)) if defined else NAN
    metrics["log_loss"] = weighted_log_loss(probs, labels)

    for k, name in enumerate(CLASSES):
        metrics[f"sensitivity_{name}"] = _rate(predicted[:, k] & positive[:, k], positive[:, k])
        metrics[f"specificity_{name}"] = _rate(~predicted[:, k] & ~positive[:, k], ~positive[:, k])
        metrics[f"positives_{name}"] = float(positive[:, k].sum())
    return metrics


def relative_accuracy(accuracy: float, baseline: float) -> float:
    """Share of the all-negative baseline's errors that the model gets right; NaN if it has none."""
    return (accuracy - baseline) / (1.0 - baseline) if baseline < 1.0 else NAN


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC: the chance that a random positive scores above a random negative, ties counting half.

    NaN for one class only, without scikit-learn's warning (older releases raise there).
    """
    # scikit-learn (with SciPy) takes about 1 s to import: only a validation pays it, not `report`,
    # `predict` or a trial's start
    from sklearn.metrics import roc_auc_score

    n_pos = int(positive.sum())
    if n_pos == 0 or n_pos == positive.size:
        return NAN
    return float(roc_auc_score(positive, scores))


def weighted_log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    """The competition metric: per image, sum(w * bce) / sum(w) with w = 2 for any; mean over images."""
    p = np.clip(probs, PROB_CLIP, 1.0 - PROB_CLIP)
    bce = -(labels * np.log(p) + (1.0 - labels) * np.log(1.0 - p))
    per_image = bce @ COMPETITION_WEIGHTS / COMPETITION_WEIGHTS.sum()
    return float(per_image.mean())


def _rate(hits: np.ndarray, population: np.ndarray) -> float:
    count = int(population.sum())
    return float(hits.sum() / count) if count else NAN


def _checked(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    well_shaped = probs.ndim == 2 and probs.shape[1] == len(CLASSES) and len(probs) > 0
    if not well_shaped or labels.shape != probs.shape:
        raise ValueError(f"expected probs and labels of shape [N > 0, {len(CLASSES)}], got "
                         f"{probs.shape} and {labels.shape}")
    if not np.all((probs >= 0.0) & (probs <= 1.0)):  # also rejects NaN
        raise ValueError("probabilities must lie in [0, 1] (pass sigmoid(logits), not logits)")
    if not np.all((labels == 0.0) | (labels == 1.0)):
        raise ValueError("labels must be 0 or 1")
    return probs, labels


def format_metrics(metrics: dict[str, float]) -> str:
    """A plain-text table of `compute_metrics` output; keys may carry a "val_" prefix."""
    plain = {key.removeprefix("val_"): value for key, value in metrics.items()}

    def show(key: str, width: int = 8, digits: int = 4) -> str:
        value = plain.get(key, NAN)
        text = "-" if math.isnan(value) else f"{value:.{digits}f}"
        return text.rjust(width)

    lines = [
        f"{'':16}{'value':>8}  {'all-neg':>8}  {'relative':>8}",
        f"{'accuracy':16}{show('accuracy')}  {show('accuracy_baseline')}  "
        f"{show('accuracy_relative')}",
        f"{'accuracy (any)':16}{show('accuracy_any')}  {show('accuracy_any_baseline')}  "
        f"{show('accuracy_any_relative')}",
        f"{'AUC (mean)':16}{show('auc_mean')}",
        f"{'RSNA log loss':16}{show('log_loss')}",
        "",
        f"{'class':18}{'positives':>9}  {'AUC':>8}  {'sens':>8}  {'spec':>8}",
    ]
    for name in CLASSES:
        lines.append(f"{name:18}{show(f'positives_{name}', 9, 0)}  {show(f'auc_{name}')}  "
                     f"{show(f'sensitivity_{name}')}  {show(f'specificity_{name}')}")
    return "\n".join(lines)
