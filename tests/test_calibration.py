"""Temperature scaling, calibration error and operating points on synthetic predictions."""

import numpy as np
import pytest

from ich_tune.evaluation.calibration import (
    apply_temperatures,
    expected_calibration_error,
    fit_temperatures,
    logits_of,
)
from ich_tune.evaluation.metrics import compute_metrics
from ich_tune.evaluation.operating import rates_at, threshold_for_sensitivity, youden_threshold


def calibrated(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Six classes whose labels are drawn from the probabilities themselves: calibrated by design."""
    rng = np.random.default_rng(seed)
    probs = 1.0 / (1.0 + np.exp(-rng.normal(-1.5, 1.5, (n, 6))))
    return probs, (rng.random((n, 6)) < probs).astype(float)


def test_temperature_scaling_mends_an_over_confident_model_and_keeps_its_ranking():
    probs, labels = calibrated(4000, seed=0)
    over_confident = 1.0 / (1.0 + np.exp(-3.0 * logits_of(probs)))  # logits three times too large
    temperatures = fit_temperatures(over_confident, labels)
    assert temperatures == pytest.approx(np.full(6, 3.0), rel=0.15)
    mended = apply_temperatures(over_confident, temperatures)
    before, after = compute_metrics(over_confident, labels), compute_metrics(mended, labels)
    assert after["log_loss"] < 0.8 * before["log_loss"]
    for name in ("auc_any", "auc_subdural", "auc_mean"):
        assert after[name] == pytest.approx(before[name], abs=1e-12)
    assert expected_calibration_error(mended[:, 5], labels[:, 5]) < \
        0.5 * expected_calibration_error(over_confident[:, 5], labels[:, 5])


def test_a_calibrated_model_keeps_a_temperature_near_one_and_a_small_error():
    probs, labels = calibrated(4000, seed=1)
    assert fit_temperatures(probs, labels) == pytest.approx(np.ones(6), rel=0.15)
    assert expected_calibration_error(probs[:, 0], labels[:, 0]) < 0.03


def test_a_class_with_one_label_only_keeps_temperature_one():
    probs, labels = calibrated(200, seed=2)
    labels[:, 0] = 0
    assert fit_temperatures(probs, labels)[0] == 1.0


def test_the_sensitivity_threshold_is_the_highest_that_reaches_the_target():
    rng = np.random.default_rng(3)
    scores, positive = rng.random(500), rng.random(500) < 0.3
    for target in (0.5, 0.9, 0.95, 1.0):
        t = threshold_for_sensitivity(scores, positive, target)
        assert (scores[positive] >= t).mean() >= target
        higher = scores[scores > t].min() if (scores > t).any() else np.inf
        assert (scores[positive] >= higher).mean() < target


def test_youden_threshold_matches_a_search_over_every_cut():
    rng = np.random.default_rng(4)
    positive = rng.random(300) < 0.4
    scores = np.round(rng.random(300) * 0.6 + positive * 0.3, 2)
    t = youden_threshold(scores, positive)
    j = {c: (scores[positive] >= c).mean() + (scores[~positive] < c).mean() - 1 for c in np.unique(scores)}
    assert j[t] == pytest.approx(max(j.values()))
    assert np.isnan(youden_threshold(scores, np.zeros(300, bool)))


def test_rates_at_thresholds_agree_with_the_metrics_at_one_half():
    probs, labels = calibrated(1000, seed=5)
    rates = rates_at(probs, labels, np.full(6, 0.5))
    metrics = compute_metrics(probs, labels)
    assert rates["sensitivity"][5] == pytest.approx(metrics["sensitivity_any"])
    assert rates["specificity"][1] == pytest.approx(metrics["specificity_intraparenchymal"])
