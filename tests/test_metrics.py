import math

import numpy as np
import pytest

from ich_tune.data.labels import CLASSES
from ich_tune.evaluation.metrics import compute_metrics, format_metrics, roc_auc, weighted_log_loss

NAN = math.nan

#                    epi  iph  ivh  sah  sdh  any
LABELS = np.array([[0, 0, 0, 0, 1, 1],
                   [0, 1, 0, 0, 0, 1],
                   [0, 0, 0, 0, 0, 0],
                   [0, 0, 0, 0, 0, 0]])
PROBS = np.array([[.1, .2, .3, .4, .8, .9],
                  [.1, .6, .3, .4, .3, .5],  # any at exactly 0.5 counts as a positive prediction
                  [.1, .6, .1, .2, .4, .3],
                  [.1, .1, .6, .4, .2, .6]])
# Predictions at >= 0.5:  epi 0000, iph 0110, ivh 0001, sah 0000, sdh 1000, any 1101.
# Per-class accuracy:     epi 4/4, iph 3/4, ivh 3/4, sah 4/4, sdh 4/4, any 3/4 -> mean 5.25/6 = 0.875
# All-negative baseline:  1 - positive rate = 1, .75, 1, 1, .75, .5 -> mean 5/6
# Relative:               (0.875 - 5/6) / (1 - 5/6) = (1/24) / (4/24) = 0.25
# any:                    accuracy .75, baseline .5, relative (.75 - .5) / .5 = .5
# AUC iph: the positive (.6) beats .2 and .1 and ties the negative .6 -> (1 + 1 + .5) / 3 = 5/6
# AUC sdh: the positive (.8) beats .3, .4, .2 -> 1
# AUC any: positives .9 and .5 vs negatives .3 and .6 -> .9 wins twice, .5 wins once -> 3/4
# AUC epi, ivh, sah: no positives -> NaN; auc_mean = (5/6 + 1 + 3/4) / 3 = 31/36
# Sensitivity: iph 1/1, sdh 1/1, any 2/2; NaN for epi, ivh, sah.
# Specificity: epi 4/4, iph 2/3 (img2 wrong), ivh 3/4, sah 4/4, sdh 3/3, any 1/2 (img3 wrong).


def pairwise_auc(scores, positive):
    """Share of (positive, negative) pairs ordered correctly, ties counting half."""
    pos, neg = scores[positive], scores[~positive]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_accuracy_baseline_and_relative_by_hand():
    m = compute_metrics(PROBS, LABELS)
    assert m["accuracy"] == pytest.approx(0.875)
    assert m["accuracy_baseline"] == pytest.approx(5 / 6)
    assert m["accuracy_relative"] == pytest.approx(0.25)
    assert m["accuracy_any"] == pytest.approx(0.75)
    assert m["accuracy_any_baseline"] == pytest.approx(0.5)
    assert m["accuracy_any_relative"] == pytest.approx(0.5)


def test_auc_with_ties_and_classes_without_positives_by_hand():
    m = compute_metrics(PROBS, LABELS)
    assert m["auc_intraparenchymal"] == pytest.approx(5 / 6)
    assert m["auc_subdural"] == 1.0
    assert m["auc_any"] == pytest.approx(0.75)
    for name in ("epidural", "intraventricular", "subarachnoid"):
        assert math.isnan(m[f"auc_{name}"])
    assert m["auc_mean"] == pytest.approx(31 / 36)


def test_sensitivity_specificity_and_positives_by_hand():
    m = compute_metrics(PROBS, LABELS)
    sensitivity = [NAN, 1, NAN, NAN, 1, 1]
    specificity = [1, 2 / 3, 3 / 4, 1, 1, 1 / 2]
    positives = [0, 1, 0, 0, 1, 2]
    for k, name in enumerate(CLASSES):
        assert m[f"sensitivity_{name}"] == pytest.approx(sensitivity[k], nan_ok=True)
        assert m[f"specificity_{name}"] == pytest.approx(specificity[k])
        assert m[f"positives_{name}"] == positives[k]
        assert isinstance(m[f"positives_{name}"], float)


def test_auc_matches_pairwise_count_with_many_ties():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(200), 1)  # 11 distinct values: ties everywhere
    positive = rng.random(200) < 0.3
    assert roc_auc(scores, positive) == pytest.approx(pairwise_auc(scores, positive))


def test_auc_perfect_inverted_constant_and_one_class():
    positive = np.array([False, False, True, True])
    assert roc_auc(np.array([.1, .2, .8, .9]), positive) == 1.0
    assert roc_auc(np.array([.9, .8, .2, .1]), positive) == 0.0
    assert roc_auc(np.full(4, .5), positive) == 0.5
    assert math.isnan(roc_auc(np.array([.1, .2]), np.array([True, True])))
    assert math.isnan(roc_auc(np.array([.1, .2]), np.array([False, False])))


def test_log_loss_by_hand():
    labels = np.array([[0, 0, 0, 0, 0, 0],
                       [0, 0, 0, 0, 1, 1],
                       [1, 0, 0, 0, 0, 1]])
    probs = np.array([[.1, .1, .1, .1, .1, .2],
                      [.5, .5, .5, .5, .9, 1.],
                      [0., 0., 0., 0., 0., 1.]])
    # -ln .9 = 0.1053605, -ln .8 = 0.2231436, ln 2 = 0.6931472, -ln 1e-7 = 16.1180957,
    # -ln(1 - 1e-7) = 1e-7 (a correct prediction of exactly 0 or 1, after clipping).
    # image 0: (5 * 0.1053605 + 2 * 0.2231436) / 7 = 0.9730897 / 7 = 0.1390128
    # image 1: (4 * 0.6931472 + 0.1053605 + 2 * 1e-7) / 7 = 2.8779494 / 7 = 0.4111356
    # image 2: (16.1180957 + 4 * 1e-7 + 2 * 1e-7) / 7 = 2.3025852
    # mean: (0.1390128 + 0.4111356 + 2.3025852) / 3 = 0.9509112
    assert weighted_log_loss(probs, labels) == pytest.approx(0.9509112, abs=1e-6)
    assert compute_metrics(probs, labels)["log_loss"] == pytest.approx(0.9509112, abs=1e-6)


def test_log_loss_of_the_shared_example_by_hand():
    # -ln of the probability given to the true answer; `any` (last) counted twice, 7 weights per image.
    # image 0: .1053605 .2231436 .3566749 .5108256 .2231436 | 2 x .1053605 -> 1.6298692 / 7 = 0.2328385
    # image 1: .1053605 .5108256 .3566749 .5108256 .3566749 | 2 x .6931472 -> 3.2266560 / 7 = 0.4609509
    # image 2: .1053605 .9162907 .1053605 .2231436 .5108256 | 2 x .3566749 -> 2.5743308 / 7 = 0.3677615
    # image 3: .1053605 .1053605 .9162907 .5108256 .2231436 | 2 x .9162907 -> 3.6935624 / 7 = 0.5276518
    # mean: 1.5892027 / 4 = 0.3973007
    assert weighted_log_loss(PROBS, LABELS) == pytest.approx(0.3973007, abs=1e-6)
    assert compute_metrics(PROBS, LABELS)["log_loss"] == pytest.approx(0.3973007, abs=1e-6)


def test_all_negative_validation_set():
    labels = np.zeros((3, 6))
    m = compute_metrics(np.full((3, 6), 0.2), labels)
    assert m["accuracy"] == 1.0 and m["accuracy_baseline"] == 1.0
    assert math.isnan(m["accuracy_relative"]) and math.isnan(m["accuracy_any_relative"])
    assert math.isnan(m["auc_mean"])
    assert m["specificity_any"] == 1.0 and math.isnan(m["sensitivity_any"])


def test_rejects_logits_and_bad_shapes():
    with pytest.raises(ValueError, match="logits"):
        compute_metrics(np.full((2, 6), 3.0), np.zeros((2, 6)))
    with pytest.raises(ValueError, match="logits"):
        compute_metrics(np.full((2, 6), np.nan), np.zeros((2, 6)))
    with pytest.raises(ValueError, match="shape"):
        compute_metrics(np.zeros((2, 5)), np.zeros((2, 5)))
    with pytest.raises(ValueError, match="shape"):
        compute_metrics(np.zeros((0, 6)), np.zeros((0, 6)))
    with pytest.raises(ValueError, match="0 or 1"):
        compute_metrics(np.zeros((2, 6)), np.full((2, 6), 0.5))


def test_format_metrics_reads_val_keys_and_shows_nan_as_dash():
    metrics = {f"val_{k}": v for k, v in compute_metrics(PROBS, LABELS).items()}
    metrics["step"] = 10
    text = format_metrics(metrics)
    assert format_metrics(compute_metrics(PROBS, LABELS)) == text
    lines = text.splitlines()
    accuracy_row = next(line for line in lines if line.startswith("accuracy "))
    assert accuracy_row.split()[1:] == ["0.8750", "0.8333", "0.2500"]
    epidural_row = next(line for line in lines if line.startswith("epidural"))
    assert epidural_row.split() == ["epidural", "0", "-", "-", "1.0000"]
    any_row = next(line for line in lines if line.startswith("any"))
    assert any_row.split() == ["any", "2", "0.7500", "1.0000", "0.5000"]
    assert "0.8611" in text  # auc_mean 31/36
