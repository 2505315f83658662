"""A model's figures with intervals, calibration fitted on validation, operating points on test."""

import numpy as np

from ich_tune.evaluation.assess import Calibration, assess, fit_calibration, html_page
from ich_tune.evaluation.calibration import logits_of
from tests.test_bootstrap import correlated_patients


def over_confident(probs: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-3.0 * logits_of(probs)))


def test_calibration_from_validation_improves_test_log_loss_and_keeps_auc():
    val_probs, val_labels, _ = correlated_patients(80, 10, seed=11)
    test_probs, test_labels, test_groups = correlated_patients(60, 10, seed=12)
    calibration = fit_calibration(over_confident(val_probs), val_labels)
    assert all(t > 1.5 for t in calibration.temperatures)  # it learned the model is over-confident
    report = assess(over_confident(test_probs), test_labels, test_groups, "test", calibration, resamples=200)
    raw = assess(over_confident(test_probs), test_labels, test_groups, "test", resamples=200)
    assert report.metrics["log_loss"] < report.log_loss_before == raw.metrics["log_loss"]
    assert report.metrics["auc_any"] == raw.metrics["auc_any"]
    low, high = report.intervals["auc_any"]
    assert low < report.metrics["auc_any"] < high


def test_operating_points_reach_their_target_on_validation_and_report_test_with_intervals():
    val_probs, val_labels, val_groups = correlated_patients(80, 10, seed=13)
    calibration = fit_calibration(val_probs, val_labels, target_sensitivity=0.9)
    on_validation = assess(val_probs, val_labels, val_groups, "val", calibration, resamples=100)
    point = next(p for p in on_validation.operating if p.label == "any" and p.rule == "sensitivity")
    assert point.sensitivity >= 0.9
    assert point.counts["tp"] + point.counts["fn"] == int(val_labels[:, 5].sum())
    test_probs, test_labels, test_groups = correlated_patients(60, 10, seed=14)
    on_test = assess(test_probs, test_labels, test_groups, "test", calibration, resamples=100)
    tested = next(p for p in on_test.operating if p.label == "any" and p.rule == "youden")
    assert tested.threshold == calibration.thresholds["youden"][5]
    assert tested.sensitivity_ci[0] <= tested.sensitivity <= tested.sensitivity_ci[1]
    lines = "\n".join(on_test.lines())
    assert "AUC mean" in lines and "[" in lines and "sensitivity threshold" in lines
    metrics = on_test.mlflow_metrics("test_")
    assert metrics["test_auc_any_ci_low"] <= metrics["test_auc_any"] <= metrics["test_auc_any_ci_high"]
    assert "test_sensitivity_any_at_youden" in metrics


def test_calibration_round_trips_and_flags_at_its_thresholds():
    probs, labels, _ = correlated_patients(40, 10, seed=15)
    calibration = fit_calibration(probs, labels)
    again = Calibration.from_dict(calibration.to_dict())
    assert again == calibration
    flags = again.flags(again.apply(probs))
    assert flags.shape == probs.shape and flags[:, 5].sum() >= 0.95 * labels[:, 5].sum() * 0.9


def test_the_report_page_holds_the_tables_and_figures():
    probs, labels, groups = correlated_patients(30, 8, seed=16)
    calibration = fit_calibration(probs, labels)
    page = html_page("demo <model>", assess(probs, labels, groups, "val", calibration, resamples=50),
                     {"roc": b"\x89PNG fake"})
    assert page.startswith("<!DOCTYPE html>") and "demo &lt;model&gt;" in page
    assert page.count("<table>") == 3 and "data:image/png;base64," in page


def test_a_model_with_noise_added_is_worse_and_a_copy_is_tied():
    from ich_tune.evaluation.ties import TIED, WORSE, compare_with_best

    probs, labels, groups = correlated_patients(80, 10, seed=17)
    noisy = np.clip(probs + np.random.default_rng(18).normal(0, 0.35, probs.shape), 0, 1)
    nearly = np.clip(probs + np.random.default_rng(19).normal(0, 0.002, probs.shape), 0, 1)
    verdicts = compare_with_best(probs, {"noisy": noisy, "nearly": nearly}, labels, groups, "auc_mean", "max",
                                 resamples=300)
    assert verdicts["noisy"][2] == WORSE and verdicts["noisy"][0] < 0 and verdicts["noisy"][1][1] < 0
    assert verdicts["nearly"][2] == TIED and verdicts["nearly"][1][0] <= 0 <= verdicts["nearly"][1][1]
    by_loss = compare_with_best(probs, {"noisy": noisy}, labels, groups, "log_loss", "min", resamples=300)
    assert by_loss["noisy"][2] == WORSE and by_loss["noisy"][0] > 0


def test_a_checkpoint_keeps_its_calibration(tmp_path, tiny_config):
    config = tiny_config()
    import torch

    from ich_tune.data.neighbours import input_channels
    from ich_tune.models import build_model
    from ich_tune.training.checkpoint import load_checkpoint, save_checkpoint

    probs, labels, _ = correlated_patients(30, 8, seed=20)
    calibration = fit_calibration(probs, labels)
    model = build_model(config.model, input_channels(config.data))
    save_checkpoint(tmp_path / "w.pt", config, model, calibration=calibration.to_dict())
    saved = load_checkpoint(tmp_path / "w.pt")
    assert Calibration.from_dict(saved.calibration) == calibration
    assert torch.equal(next(iter(saved.state_dict.values())), next(iter(model.state_dict().values())))
    save_checkpoint(tmp_path / "plain.pt", config, model)
    assert load_checkpoint(tmp_path / "plain.pt").calibration is None
