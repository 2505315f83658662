"""Patient-level bootstrap intervals: exact per resample, equal to a plain loop, wider than slices'."""

import numpy as np
import pytest

from ich_tune.data.labels import CLASSES
from ich_tune.evaluation import bootstrap
from ich_tune.evaluation.metrics import compute_metrics


def correlated_patients(patients: int, slices: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slices of one patient share that patient's bleed risk and how well the model sees them."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(patients), slices)
    risk = rng.beta(0.5, 2.0, patients)[groups]
    visibility = rng.normal(0.0, 1.0, patients)[groups]
    labels = np.zeros((len(groups), len(CLASSES)))
    labels[:, :5] = rng.random((len(groups), 5)) < risk[:, None] * [0.1, 0.5, 0.4, 0.5, 0.6]
    labels[:, 5] = labels[:, :5].max(axis=1)
    logits = (labels - 0.5) * (1.0 + visibility[:, None]) + rng.normal(0.0, 1.0, labels.shape)
    probs = np.round(1.0 / (1.0 + np.exp(-logits)), 2)  # rounded: ties in the AUC on purpose
    return probs, labels, groups


def test_a_resample_that_draws_every_patient_once_gives_the_plain_metrics():
    probs, labels, groups = correlated_patients(30, 8, seed=1)
    codes, _ = bootstrap.patient_counts(groups, 1, 0)
    once = np.ones((1, codes.max() + 1))
    plain = compute_metrics(probs, labels)
    values = bootstrap.resampled_metrics(probs, labels, codes, once)
    for name, samples in values.items():
        assert samples[0] == pytest.approx(plain[name], nan_ok=True), name


def test_a_patient_drawn_twice_counts_twice():
    probs, labels, groups = correlated_patients(12, 5, seed=2)
    codes, _ = bootstrap.patient_counts(groups, 1, 0)
    draws = np.random.default_rng(3).multinomial(12, np.full(12, 1 / 12), size=4).astype(float)
    values = bootstrap.resampled_metrics(probs, labels, codes, draws)
    for b, counts in enumerate(draws):
        rows = np.repeat(np.arange(len(codes)), counts[codes].astype(int))  # as often as its patient
        expected = compute_metrics(probs[rows], labels[rows])
        for name in ("accuracy", "auc_any", "auc_mean", "log_loss", "sensitivity_any", "specificity_any"):
            assert values[name][b] == pytest.approx(expected[name], nan_ok=True), (name, b)


def plain_patient_bootstrap(probs, labels, groups, resamples: int, seed: int) -> dict[str, tuple]:
    """The slow way: draw patients, gather their slices, compute the metrics, take percentiles."""
    rng = np.random.default_rng(seed)
    patients = np.unique(groups)
    rows_of = {p: np.flatnonzero(groups == p) for p in patients}
    samples: dict[str, list[float]] = {}
    for _ in range(resamples):
        rows = np.concatenate([rows_of[p] for p in rng.choice(patients, len(patients))])
        for name, value in compute_metrics(probs[rows], labels[rows]).items():
            samples.setdefault(name, []).append(value)
    return {name: tuple(np.nanpercentile(values, [2.5, 97.5])) for name, values in samples.items()}


def test_intervals_match_a_plain_per_patient_bootstrap_within_monte_carlo_error():
    probs, labels, groups = correlated_patients(60, 10, seed=4)
    fast = bootstrap.intervals(bootstrap.bootstrap_metrics(probs, labels, groups, resamples=2000, seed=5))
    slow = plain_patient_bootstrap(probs, labels, groups, resamples=600, seed=6)
    for name in ("accuracy", "accuracy_any", "auc_any", "auc_mean", "log_loss", "sensitivity_any",
                 "specificity_any"):
        width = slow[name][1] - slow[name][0]
        assert width > 0, name
        for ours, theirs in zip(fast[name], slow[name], strict=True):
            assert abs(ours - theirs) < 0.15 * width, (name, fast[name], slow[name])


def test_resampling_patients_gives_wider_intervals_than_resampling_slices():
    probs, labels, groups = correlated_patients(40, 20, seed=7)
    by_patient = bootstrap.intervals(bootstrap.bootstrap_metrics(probs, labels, groups, seed=8))
    by_slice = bootstrap.intervals(bootstrap.bootstrap_metrics(probs, labels, np.arange(len(groups)), seed=8))
    for name in ("accuracy", "auc_any", "log_loss", "sensitivity_any"):
        patient_width = by_patient[name][1] - by_patient[name][0]
        slice_width = by_slice[name][1] - by_slice[name][0]
        assert patient_width > 1.3 * slice_width, (name, by_patient[name], by_slice[name])


def test_a_class_no_resample_can_measure_has_no_interval():
    probs, labels, groups = correlated_patients(10, 4, seed=9)
    labels[:, 0] = 0  # no epidural bleed anywhere
    bounds = bootstrap.intervals(bootstrap.bootstrap_metrics(probs, labels, groups, resamples=50))
    assert np.isnan(bounds["auc_epidural"]).all() and np.isnan(bounds["sensitivity_epidural"]).all()
    assert bounds["specificity_epidural"][0] <= bounds["specificity_epidural"][1]


def test_roc_bands_hold_the_curve_of_the_whole_set():
    from sklearn.metrics import roc_curve

    probs, labels, groups = correlated_patients(40, 10, seed=10)
    grid = np.linspace(0.0, 1.0, 21)
    bands = bootstrap.roc_bands(probs, labels, groups, grid, resamples=300)
    fpr, tpr, _ = roc_curve(labels[:, 5], probs[:, 5])
    curve = np.interp(grid, fpr, tpr)
    inside = (bands["low"][5] - 1e-9 <= curve) & (curve <= bands["high"][5] + 1e-9)
    assert inside.mean() >= 0.9
    assert (bands["high"][5] - bands["low"][5])[5:15].min() > 0.01  # a band, not a line
