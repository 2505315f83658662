"""Figures: the example grid's picks, bars and colours by hand, and every figure as a valid PNG."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ich_tune.evaluation import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

#  epidural, intraparenchymal, intraventricular, subarachnoid, subdural, any
LABELS = np.array([
    [0, 0, 0, 0, 0, 0],
    [1, 0, 0, 0, 1, 1],
    [0, 1, 0, 0, 0, 1],
    [0, 0, 0, 0, 0, 0],
    [1, 0, 0, 0, 0, 1],
    [0, 0, 0, 1, 0, 1],
], np.uint8)


def decoded(data: bytes) -> np.ndarray:
    assert data.startswith(PNG_SIGNATURE)
    pixels = plots.png_to_array(data)
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    assert pixels.std() > 0  # something was drawn
    return pixels


def test_columns_are_control_then_the_six_classes():
    assert plots.COLUMNS == ("Control", "Epidural", "Intraparenchymal", "Intraventricular",
                             "Subarachnoid", "Subdural", "Any")


def test_pick_examples_takes_every_fitting_slice_when_there_are_few():
    assert plots.pick_examples(LABELS, 6, seed=0) == {
        "Control": [0, 3], "Epidural": [1, 4], "Intraparenchymal": [2], "Intraventricular": [],
        "Subarachnoid": [5], "Subdural": [1], "Any": [1, 2, 4, 5],
    }


def test_pick_examples_only_takes_slices_with_the_column_label():
    labels = (np.random.default_rng(7).random((300, 6)) < 0.1).astype(np.uint8)
    labels[:, 5] = labels[:, :5].max(axis=1)
    picks = plots.pick_examples(labels, 6, seed=3)
    assert all(len(rows) == 6 for rows in picks.values())
    assert not labels[picks["Control"]].any()
    for k, column in enumerate(plots.COLUMNS[1:]):
        assert labels[picks[column], k].all(), column


def test_pick_examples_is_deterministic_per_seed():
    labels = (np.random.default_rng(1).random((300, 6)) < 0.2).astype(np.uint8)
    assert plots.pick_examples(labels, 4, seed=5) == plots.pick_examples(labels, 4, seed=5)
    assert plots.pick_examples(labels, 4, seed=5) != plots.pick_examples(labels, 4, seed=6)


def test_bar_values_for_a_class_column():
    label = np.array([1, 0, 0, 0, 1, 1])
    prob = np.array([0.9, 0.6, 0.1, 0.2, 0.3, 0.8])  # called: epidural, intraparenchymal, any
    # right: epidural, intraventricular, subarachnoid, any -> 4 of 6
    assert plots.bar_values(label, prob, "Epidural") == (1.0, pytest.approx(4 / 6))
    assert plots.bar_values(label, prob, "Subdural") == (0.0, pytest.approx(4 / 6))  # missed
    assert plots.bar_values(label, prob, "Intraparenchymal")[0] == 0.0  # false positive
    assert plots.bar_values(label, prob, "Any")[0] == 1.0


def test_bar_values_threshold_is_inclusive():
    label = np.array([0, 0, 0, 0, 1, 1])
    prob = np.array([0.0, 0.0, 0.0, 0.0, 0.5, 0.5])
    assert plots.bar_values(label, prob, "Subdural") == (1.0, 1.0)


def test_control_is_right_only_when_nothing_is_called():
    healthy = np.zeros(6)
    assert plots.bar_values(healthy, np.full(6, 0.1), "Control") == (1.0, 1.0)
    one_call = np.array([0.1, 0.1, 0.1, 0.7, 0.1, 0.4])
    assert plots.bar_values(healthy, one_call, "Control") == (0.0, pytest.approx(5 / 6))


def test_bar_colour_runs_from_red_at_the_baseline_to_green_at_one():
    assert plots.bar_colour(0.2, baseline=0.2) == pytest.approx(plots.RED)
    assert plots.bar_colour(0.0, baseline=0.2) == pytest.approx(plots.RED)
    assert plots.bar_colour(1.0, baseline=0.2) == pytest.approx(plots.GREEN)
    middle = [(r + g) / 2 for r, g in zip(plots.RED, plots.GREEN, strict=True)]
    assert plots.bar_colour(0.6, baseline=0.2) == pytest.approx(middle)
    assert plots.bar_colour(0.75, baseline=0.5) == pytest.approx(middle)
    assert plots.GREEN[1] > 0.8 > plots.GREEN[0] and plots.RED[0] > 0.8 > plots.RED[1]


def test_display_image_windows_each_storage_form():
    windows = np.stack([np.full((4, 4), v, np.uint8) for v in (255, 0, 51)])
    rgb = plots.display_image(windows)
    assert rgb.shape == (4, 4, 3) and rgb[0, 0] == pytest.approx([1.0, 0.0, 0.2])
    assert plots.display_image(windows[:1]).shape == (4, 4)
    hu = (np.array([[-100.0, 0.0, 40.0, 80.0, 1000.0]]) / 1024).astype(np.float16)[None]
    assert plots.display_image(hu)[0] == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0], abs=1e-3)


def slices(copies: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windowed noise slices labelled like `copies` of LABELS, probabilities near the labels."""
    labels = np.tile(LABELS, (copies, 1))
    images = rng.integers(0, 256, (len(labels), 3, 32, 32), dtype=np.uint8)
    probs = np.clip(labels * 0.8 + rng.normal(0.1, 0.2, labels.shape), 0, 1)
    return images, labels, probs


def test_example_layout_leaves_blank_cells_exactly_where_a_column_runs_out():
    rows = plots.example_layout(LABELS, 4, seed=0)
    #        Control  Epidural  IPH    IVH   SAH   SDH   Any
    assert rows == [
        [0, 1, 2, None, 5, 1, 1],
        [3, 4, None, None, None, None, 2],
        [None, None, None, None, None, None, 4],
        [None, None, None, None, None, None, 5],
    ]


def test_example_layout_fills_every_cell_when_each_column_has_enough():
    labels = (np.random.default_rng(7).random((300, 6)) < 0.1).astype(np.uint8)
    labels[:, 5] = labels[:, :5].max(axis=1)
    rows = plots.example_layout(labels, 6, seed=3)
    picks = plots.pick_examples(labels, 6, seed=3)
    assert [[row[col] for row in rows] for col in range(len(plots.COLUMNS))] == list(picks.values())


@pytest.mark.parametrize("form", ["windows", "brain", "hu"])
def test_example_grid_draws_every_storage_form(form):
    rng = np.random.default_rng(0)
    images, labels, probs = slices(2, rng)
    if form == "brain":
        images = images[:, :1]
    elif form == "hu":
        images = (images[:, :1].astype(np.float32) - 100) / 1024
        images = images.astype(np.float16)
    pixels = decoded(plots.example_grid(images, labels, probs, examples=3, seed=1))
    assert pixels.shape[1] == pytest.approx(plots.DPI * (1.75 * 7 + 0.3), abs=2)
    assert pixels.shape[0] == pytest.approx(plots.DPI * (2.07 * 3 + 2.0), abs=2)


def test_example_grid_draws_the_layout_and_leaves_its_blank_cells_empty(monkeypatch):
    images, labels, probs = slices(2, np.random.default_rng(0))  # no intraventricular slice at all
    images[:] = np.arange(len(images), dtype=np.uint8)[:, None, None, None]  # pixels name the row
    drawn = []
    draw = plots._draw_example

    def record(image_ax, bar_ax, image, label_row, prob_row, column, baseline):
        index = int(image[0, 0, 0])
        assert (label_row == labels[index]).all() and (prob_row == probs[index]).all()
        drawn.append((column, index))
        draw(image_ax, bar_ax, image, label_row, prob_row, column, baseline)

    monkeypatch.setattr(plots, "_draw_example", record)
    decoded(plots.example_grid(images, labels, probs, examples=5, seed=1))
    layout = plots.example_layout(labels, 5, seed=1)
    expected = [(column, rows[col]) for col, column in enumerate(plots.COLUMNS) for rows in layout
                if rows[col] is not None]
    assert sorted(drawn) == sorted(expected)
    assert None in [rows[plots.COLUMNS.index("Subarachnoid")] for rows in layout]  # some blanks
    assert all(rows[plots.COLUMNS.index("Intraventricular")] is None for rows in layout)


def roc_labels() -> np.ndarray:
    """50 slices: no epidural, every slice positive for any, the other four classes mixed."""
    labels = (np.random.default_rng(2).random((50, 6)) < 0.3).astype(np.uint8)
    labels[:, 0] = 0
    labels[:, 5] = 1
    return labels


def test_roc_classes_skip_classes_without_both_outcomes():
    drawn, skipped = plots.roc_classes(roc_labels())
    assert drawn == ["intraparenchymal", "intraventricular", "subarachnoid", "subdural"]
    assert skipped == {"epidural": "no positives", "any": "no negatives"}
    assert plots.roc_classes(np.zeros((0, 6))) == ([], dict.fromkeys(plots.CLASSES, "no positives"))


def test_roc_curves_draw_only_the_classes_with_both_outcomes(monkeypatch):
    labels = roc_labels()
    probs = np.clip(labels * 0.5 + np.random.default_rng(3).random((50, 6)) * 0.5, 0, 1)
    curves = []
    points = plots._roc_points

    def record(scores, positive):
        (k,) = [k for k in range(6) if np.array_equal(scores, probs[:, k])]
        curves.append(plots.CLASSES[k])
        return points(scores, positive)

    monkeypatch.setattr(plots, "_roc_points", record)
    pixels = decoded(plots.roc_curves(probs, labels))
    assert 600 < pixels.shape[0] < 1500 and 600 < pixels.shape[1] < 1500
    assert curves == plots.roc_classes(labels)[0]


def test_roc_points_step_through_ties_together():
    fpr, tpr = plots._roc_points(np.array([0.9, 0.5, 0.5, 0.1]), np.array([True, True, False, False]))
    assert fpr.tolist() == [0.0, 0.0, 0.5, 1.0]
    assert tpr.tolist() == [0.0, 0.5, 1.0, 1.0]


def test_training_curves_take_partial_and_empty_histories():
    history = [
        {"step": 0, "val_accuracy": 0.9, "val_accuracy_baseline": 0.94, "val_auc_mean": math.nan,
         "val_log_loss": 0.4},
        {"step": 100, "val_accuracy": np.float32(0.95), "val_accuracy_baseline": 0.94,
         "val_auc_mean": 0.8, "val_auc_any": 0.85, "val_log_loss": 0.2, "note": "text"},
    ]
    assert decoded(plots.training_curves(history)).shape[1] > 1000
    decoded(plots.training_curves([{"step": 3}]))
    decoded(plots.training_curves([]))


def test_save_png_creates_folders(tmp_path):
    data = plots.training_curves([])
    path = plots.save_png(data, tmp_path / "a" / "b.png")
    assert path.read_bytes() == data
