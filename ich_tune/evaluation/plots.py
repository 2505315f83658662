"""Figures for runs: the original's example grid (Figure 1), per-class ROC curves, training curves,
what mattered in a search.

Everything draws on a private `Figure` with the Agg canvas, never pyplot's global state, so the
functions are safe in Ray workers and threads; each returns PNG bytes ready for MLflow or disk.
"""

from __future__ import annotations

import io
import math
import numbers
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from PIL import Image

from ich_tune.data.labels import CLASSES, SHORT_NAMES
from ich_tune.evaluation.calibration import expected_calibration_error, reliability
from ich_tune.evaluation.metrics import THRESHOLD, roc_auc

COLUMNS = ("Control", *(name.capitalize() for name in CLASSES))
RED = (0.86, 0.08, 0.08)  # accuracy at or below the baseline
GREEN = (0.05, 0.90, 0.05)  # accuracy 1.0
BRAIN_WINDOW = (40.0, 80.0)  # center, width in HU, for "hu" channels
DPI = 150


def pick_examples(labels: np.ndarray, examples: int, seed: int) -> dict[str, list[int]]:
    """Row indices shown per column, in index order: slices with at least that label.

    Control takes only slices with no label at all. Each column draws from its own stream of
    `seed`, so one column's picks do not change when another column has more slices.
    """
    positive = np.asarray(labels) == 1
    masks = [~positive.any(axis=1), *positive.T]
    picks = {}
    for index, (column, mask) in enumerate(zip(COLUMNS, masks, strict=True)):
        candidates = np.flatnonzero(mask)
        rng = np.random.default_rng([seed, index])
        chosen = rng.choice(candidates, size=min(examples, len(candidates)), replace=False)
        picks[column] = sorted(int(i) for i in chosen)
    return picks


def example_layout(labels: np.ndarray, examples: int, seed: int) -> list[list[int | None]]:
    """The grid's cells as slice indices, [row][column] in COLUMNS order; None is a blank cell.

    Kept apart from the drawing so that what the figure shows, and where a column ran out of slices,
    can be checked without reading pixels.
    """
    picks = pick_examples(labels, examples, seed)
    return [[picks[column][row] if row < len(picks[column]) else None for column in COLUMNS]
            for row in range(examples)]


def bar_values(label_row: np.ndarray, prob_row: np.ndarray, column: str) -> tuple[float, float]:
    """(left, right) indicator values of one slice, each the accuracy at threshold 0.5.

    left: 1.0 if the column's class is predicted right, else 0.0. For Control the class is
    "no bleed at all": its truth is that all six labels are 0, its prediction that all six
    probabilities are below the threshold, so a control slice scores 1.0 only when nothing is
    called. right: the share of the six labels predicted right (k / 6).
    """
    truth = np.asarray(label_row) == 1
    called = np.asarray(prob_row) >= THRESHOLD
    if column == COLUMNS[0]:
        left = float(truth.any() == called.any())
    else:
        k = COLUMNS.index(column) - 1
        left = float(truth[k] == called[k])
    return left, float((truth == called).mean())


def bar_colour(value: float, baseline: float) -> tuple[float, float, float]:
    """RGB from RED at `baseline` (and below) to GREEN at 1.0, linear in between."""
    span = 1.0 - baseline
    t = float(np.clip((value - baseline) / span, 0.0, 1.0)) if span > 0 else float(value >= 1.0)
    return tuple(r + t * (g - r) for r, g in zip(RED, GREEN, strict=True))


def display_image(image: np.ndarray) -> np.ndarray:
    """A [C, H, W] slice in storage form as a picture in [0, 1]: [H, W] grey or [H, W, 3] RGB.

    Three uint8 windows (the usual brain, subdural, bone) become an RGB composite: it is what
    the model sees, and thin subdural crescents and the skull stay visible where the brain
    window alone saturates them (FACTS.md). Other window counts show channel 0, the first
    window, in grey. "hu" channels hold HU / 1024 and are shown in the brain window.
    """
    image = np.asarray(image)
    if image.dtype == np.uint8:
        if image.shape[0] == 3:
            return image.transpose(1, 2, 0) / 255.0
        return image[0] / 255.0
    center, width = BRAIN_WINDOW
    hu = image[0].astype(np.float32) * 1024.0
    return np.clip((hu - (center - width / 2)) / width, 0.0, 1.0)


def example_grid(
    images: np.ndarray,
    labels: np.ndarray,
    probs: np.ndarray,
    examples: int = 6,
    baseline: float = 0.2,
    seed: int = 0,
) -> bytes:
    """The original's Figure 1 as PNG: `examples` slices per column, two accuracy bars under each.

    `images` [N, C, H, W] in storage form, or anything indexable by row (only the picked rows are
    read, so a view of a memory-mapped cache will do); `labels` and `probs` [N, 6] in CLASSES order.
    Columns run out of slices quietly: their title says how many there were.
    """
    labels, probs = np.asarray(labels), np.asarray(probs)
    layout = example_layout(labels, examples, seed)
    positive = labels == 1
    available = [int((~positive.any(axis=1)).sum()), *positive.sum(axis=0).tolist()]
    cell = 1.75  # inches per column
    fig = Figure(figsize=(cell * len(COLUMNS) + 0.3, (cell + 0.32) * examples + 2.0), dpi=DPI)
    legend_in, title_in = 1.45, 0.75
    grid = fig.add_gridspec(examples, len(COLUMNS), left=0.01, right=0.99, wspace=0.06,
                            hspace=0.10, top=1 - title_in / fig.get_figheight(),
                            bottom=legend_in / fig.get_figheight())
    for col, column in enumerate(COLUMNS):
        for row in range(examples):
            image_ax, bar_ax = (fig.add_subplot(spec) for spec in grid[row, col].subgridspec(
                2, 1, height_ratios=[1.0, 0.17], hspace=0.04))
            for ax in (image_ax, bar_ax):
                ax.set_axis_off()
            if row == 0:
                image_ax.set_title(f"{column}\n{available[col]} available", fontsize=12, pad=6,
                                   fontweight="bold", linespacing=1.5)
            index = layout[row][col]
            if index is not None:
                _draw_example(image_ax, bar_ax, images[index], labels[index], probs[index], column,
                              baseline)
    _draw_legend(fig.add_axes((0.03, 0.0, 0.94, (legend_in - 0.4) / fig.get_figheight())),
                 baseline)
    return _png(fig)


def _draw_example(image_ax: Axes, bar_ax: Axes, image: np.ndarray, label_row: np.ndarray,
                  prob_row: np.ndarray, column: str, baseline: float) -> None:
    picture = display_image(image)
    image_ax.imshow(picture, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    present = [name for name, y in zip(SHORT_NAMES[:-1], label_row[:-1], strict=True) if y == 1]
    image_ax.text(0.03, 0.97, " ".join(present) or "no bleed", transform=image_ax.transAxes,
                  fontsize=8, color="white", va="top", ha="left",
                  bbox={"facecolor": "black", "alpha": 0.6, "pad": 1.5, "linewidth": 0})
    left, right = bar_values(label_row, prob_row, column)
    bar_ax.set_xlim(0, 1)
    bar_ax.set_ylim(0, 1)
    for x0, value, text in ((0.0, left, "✔" if left == 1.0 else "✘"),
                            (0.52, right, f"{round(right * len(CLASSES))}/{len(CLASSES)}")):
        colour = bar_colour(value, baseline)
        bar_ax.add_patch(Rectangle((x0, 0.0), 0.48, 1.0, facecolor=colour, edgecolor="black",
                                   linewidth=0.6))
        bar_ax.text(x0 + 0.24, 0.5, text, ha="center", va="center_baseline", fontsize=11,
                    fontweight="bold", color=_ink(colour))


def _draw_legend(ax: Axes, baseline: float) -> None:
    """Explains columns, bars and colours in words, so the figure reads on its own."""
    ax.set_axis_off()
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    lines = (
        "Columns: slices with at least that label (so other bleeds may show too); Control: no label.",
        f"Left bar: the column's class predicted right at p ≥ {THRESHOLD:g} (✔ / ✘); "
        "Control is right only when no label is called.",
        "Right bar: how many of the six labels are predicted right.",
        "Corner tags: EDH epidural, IPH intraparenchymal, IVH intraventricular, SAH subarachnoid, "
        "SDH subdural.",
    )
    for row, line in enumerate(lines):
        ax.text(0.0, 1.0 - row / len(lines), line, fontsize=10, va="top")
    ramp = np.linspace(0.0, 1.0, 256)
    scale = ax.inset_axes((0.72, 0.55, 0.27, 0.3))
    scale.imshow([[bar_colour(v, baseline) for v in ramp]], aspect="auto", extent=(0, 1, 0, 1))
    scale.set_yticks([])
    scale.set_xticks(sorted({0.0, baseline, 0.5, 1.0}))
    scale.tick_params(labelsize=9)
    scale.set_xlabel(f"bar colour: accuracy, red ≤ baseline {baseline:g}", fontsize=10)


def roc_classes(labels: np.ndarray) -> tuple[list[str], dict[str, str]]:
    """(drawn, skipped) classes of the ROC figure: a curve needs both positives and negatives.

    `skipped` maps each left-out class to what it lacks, "no positives" or "no negatives".
    """
    drawn, skipped = [], {}
    for name, positive in zip(CLASSES, (np.asarray(labels) == 1).T, strict=True):
        if not positive.any():
            skipped[name] = "no positives"
        elif positive.all():
            skipped[name] = "no negatives"
        else:
            drawn.append(name)
    return drawn, skipped


def roc_curves(probs: np.ndarray, labels: np.ndarray, bands: dict[str, np.ndarray] | None = None) -> bytes:
    """Per-class ROC curves in one plot, AUC in the legend; classes lacking either outcome noted.

    `bands` (from bootstrap.roc_bands: "grid", "low", "high") shades each curve's 95% band."""
    probs, positive = np.asarray(probs, dtype=np.float64), np.asarray(labels) == 1
    drawn, skipped = roc_classes(labels)
    fig = Figure(figsize=(6.4, 6.0), dpi=DPI)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="chance (AUC 0.5)")
    for name in drawn:
        k = CLASSES.index(name)
        auc = roc_auc(probs[:, k], positive[:, k])
        fpr, tpr = _roc_points(probs[:, k], positive[:, k])
        colour = "black" if name == "any" else f"C{k}"
        ax.plot(fpr, tpr, linewidth=2.2 if name == "any" else 1.5, color=colour,
                label=f"{name}: AUC {auc:.3f} ({int(positive[:, k].sum())} positive)")
        if bands is not None and not np.isnan(bands["low"][k]).all():
            ax.fill_between(bands["grid"], bands["low"][k], bands["high"][k], color=colour, alpha=0.12,
                            linewidth=0)
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal",
           xlabel="false positive rate (1 - specificity)", ylabel="true positive rate (sensitivity)")
    shaded = ", shaded: 95% band over patient resamples" if bands is not None else ""
    ax.set_title(f"ROC per class, {len(probs)} slices{shaded}", fontsize=11 if bands is not None else 12)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    if skipped:
        note = ", ".join(f"{name} ({why})" for name, why in skipped.items())
        fig.text(0.5, 0.01, f"not drawn: {note}", ha="center", va="bottom", fontsize=9,
                 color="dimgrey")
    fig.tight_layout(rect=(0, 0.04 if skipped else 0, 1, 1))
    return _png(fig)


def _roc_points(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct threshold, from (0, 0) to (1, 1); tied scores move together."""
    # scikit-learn (with SciPy) takes about 1 s to import: only a ROC figure pays it
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(positive, scores, drop_intermediate=False)
    return fpr, tpr


def reliability_diagram(probs: np.ndarray, labels: np.ndarray, calibrated: np.ndarray | None = None) -> bytes:
    """One panel per class: observed rate of bleeds against mean predicted probability in equal-width
    bins (on the diagonal when calibrated), before and, if given, after temperature scaling."""
    positive = np.asarray(labels) == 1
    fig = Figure(figsize=(13.5, 8.4), dpi=DPI)
    shown = [("model", probs, "C0")]
    if calibrated is not None:
        shown.append(("temperature-scaled", calibrated, "C3"))
    for k, ax in enumerate(fig.subplots(2, 3).ravel()):
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        for label, values, colour in shown:
            table = reliability(values[:, k], positive[:, k])
            filled = table["count"] > 0
            error = expected_calibration_error(values[:, k], positive[:, k])
            ax.plot(table["predicted"][filled], table["observed"][filled], marker="o", markersize=3,
                    color=colour, label=f"{label}: ECE {error:.3f}")
        ax.set(xlim=(0, 1), ylim=(0, 1), aspect="equal", xlabel="mean predicted probability",
               ylabel="observed rate")
        ax.set_title(f"{CLASSES[k]} ({int(positive[:, k].sum())} positive of {len(positive)})", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return _png(fig)


_BASELINE = {"color": "grey", "linestyle": "--", "marker": ""}
_PANELS = (  # title, [(history key, legend label, plot style)]
    ("accuracy", [("val_accuracy", "model", {}),
                  ("val_accuracy_baseline", "all-negative baseline", _BASELINE)]),
    ("AUC", [("val_auc_mean", "mean of classes", {}), ("val_auc_any", "any", {})]),
    ("RSNA weighted log loss", [("val_log_loss", "model", {})]),
)


def training_curves(history: list[dict]) -> bytes:
    """Validation accuracy (with its all-negative baseline), AUC and log loss against step.

    Missing keys and NaN values leave gaps instead of failing: early or partial histories plot.
    """
    steps = [entry.get("step", index) for index, entry in enumerate(history)]
    fig = Figure(figsize=(13.5, 4.2), dpi=DPI)
    for ax, (title, series) in zip(fig.subplots(1, len(_PANELS)), _PANELS, strict=True):
        drawn = False
        for key, label, style in series:
            values = [_number(entry.get(key)) for entry in history]
            if all(math.isnan(v) for v in values):
                continue
            ax.plot(steps, values, **({"marker": "o", "markersize": 3} | style), linewidth=1.6,
                    label=label)
            drawn = True
        if drawn:
            ax.legend(fontsize=9)
        else:
            ax.text(0.5, 0.5, "no values yet", transform=ax.transAxes, ha="center",
                    va="center", color="dimgrey", fontsize=11)
        ax.set_title(f"validation {title}", fontsize=12)
        ax.set_xlabel("step", fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def best_so_far(curves: dict[str, tuple[list[float], list[float]]], metric: str, mode: str,
                reference: float | None = None) -> bytes:
    """The best metric found so far against training steps spent so far, one line per search
    variant (name -> (cumulative steps, metric after each validation)): which reaches a good model
    for the least compute. `reference` (the full grid's best) is drawn as a dashed line."""
    better = np.fmax.accumulate if mode == "max" else np.fmin.accumulate
    fig = Figure(figsize=(8, 5), dpi=DPI)
    ax = fig.subplots()
    for name, (steps, values) in curves.items():
        if len(steps):
            ax.step(steps, better(np.asarray(values, float)), where="post", linewidth=1.6, label=name)
    if reference is not None:
        ax.axhline(reference, label="full grid's best", **_BASELINE)
    ax.set_xlabel("training steps spent (all trials)", fontsize=10)
    ax.set_ylabel(f"best {metric} so far", fontsize=10)
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def importance_bars(shares: dict[str, float], title: str) -> bytes:
    """One horizontal bar per searched key, its share of the metric's variance, largest on top."""
    fig = Figure(figsize=(7, 1.2 + 0.45 * len(shares)), dpi=DPI)
    ax = fig.subplots()
    keys = list(shares)[::-1]
    bars = ax.barh(keys, [shares[key] for key in keys], color="C0")
    ax.bar_label(bars, fmt="%.2f", padding=3, fontsize=9)
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("share of the variance (fANOVA)", fontsize=10)
    ax.set_title(title, fontsize=11)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def png_to_array(data: bytes) -> np.ndarray:
    """[H, W, 3] uint8 pixels of PNG bytes, e.g. for TensorBoard's add_image(dataformats="HWC")."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def save_png(data: bytes, path: Path) -> Path:
    """Write PNG bytes, creating parent folders; returns the path for logging."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _number(value: object) -> float:
    """A metric as float; anything that is not a number (None, a string, a bool) becomes NaN."""
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    return float(value) if is_number else math.nan


def _ink(colour: tuple[float, float, float]) -> str:
    """Black text on light fills, white on dark, by relative luminance."""
    r, g, b = colour
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else "white"


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer)
    return buffer.getvalue()
