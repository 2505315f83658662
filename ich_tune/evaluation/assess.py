"""A model's figures as a paper would print them: each metric with its patient-level 95% interval,
calibration before and after temperature scaling, and sensitivity/specificity at thresholds chosen
on validation; as console lines, MLflow metrics and an HTML page.

What is fitted (temperatures, thresholds) comes from validation only (`fit_calibration`); `assess`
applies it to whatever split it is given, so a test figure never sees its own labels twice.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from ich_tune.data.labels import CLASSES
from ich_tune.evaluation import bootstrap
from ich_tune.evaluation.calibration import apply_temperatures, expected_calibration_error, fit_temperatures
from ich_tune.evaluation.metrics import compute_metrics, format_metrics
from ich_tune.evaluation.operating import TARGET_SENSITIVITY, threshold_for_sensitivity, youden_threshold
from ich_tune.evaluation.page import Page

RULES = ("sensitivity", "youden")  # operating-point rules: a target sensitivity, and Youden's J
HEADLINE = ("accuracy", "accuracy_baseline", "accuracy_any", "auc_mean", "auc_any", "log_loss",
            "sensitivity_any", "specificity_any")  # what a console summary shows with intervals


@dataclass
class Calibration:
    """What validation taught beyond the weights: a temperature per class and the thresholds of each
    rule per class (on the temperature-scaled probabilities). Stored with the model."""

    temperatures: list[float]
    thresholds: dict[str, list[float]]  # rule -> one threshold per class (NaN where undefined)
    target_sensitivity: float = TARGET_SENSITIVITY

    def apply(self, probs: np.ndarray) -> np.ndarray:
        return apply_temperatures(probs, np.asarray(self.temperatures))

    def flags(self, probs: np.ndarray, rule: str = "sensitivity") -> np.ndarray:
        """Yes/no per class of already calibrated probabilities; no where the threshold is undefined."""
        thresholds = np.asarray(self.thresholds[rule], dtype=np.float64)
        return np.where(np.isnan(thresholds), False, probs >= np.nan_to_num(thresholds, nan=np.inf))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> Calibration:
        return cls([float(t) for t in saved["temperatures"]],
                   {rule: [float(t) for t in values] for rule, values in saved["thresholds"].items()},
                   float(saved.get("target_sensitivity", TARGET_SENSITIVITY)))


def fit_calibration(probs: np.ndarray, labels: np.ndarray,
                    target_sensitivity: float = TARGET_SENSITIVITY) -> Calibration:
    """Temperatures, then thresholds on the scaled probabilities: from validation predictions only."""
    temperatures = fit_temperatures(probs, labels)
    scaled = apply_temperatures(probs, temperatures)
    positive = np.asarray(labels) == 1
    thresholds = {
        "sensitivity": [threshold_for_sensitivity(scaled[:, k], positive[:, k], target_sensitivity)
                        for k in range(len(CLASSES))],
        "youden": [youden_threshold(scaled[:, k], positive[:, k]) for k in range(len(CLASSES))],
    }
    return Calibration([float(t) for t in temperatures], thresholds, target_sensitivity)


@dataclass
class OperatingPoint:
    label: str
    rule: str
    threshold: float
    sensitivity: float
    sensitivity_ci: tuple[float, float]
    specificity: float
    specificity_ci: tuple[float, float]
    counts: dict[str, int]  # tp, fp, fn, tn


@dataclass
class Assessment:
    split: str
    slices: int
    patients: int
    resamples: int
    metrics: dict[str, float]  # of the temperature-scaled probabilities where a calibration is given
    intervals: dict[str, tuple[float, float]]
    log_loss_before: float  # ... and of the raw ones
    ece_before: list[float]
    ece_after: list[float] | None
    operating: list[OperatingPoint] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The console summary: headline metrics with intervals, calibration, operating points of any."""
        shown = {name: with_interval(self.metrics[name], self.intervals.get(name)) for name in HEADLINE}
        out = [f"{self.split}: {self.slices} slices of {self.patients} patients; 95% intervals from "
               f"{self.resamples} patient resamples",
               f"  accuracy {shown['accuracy']} (all-negative {shown['accuracy_baseline']}), any "
               f"{shown['accuracy_any']}",
               f"  AUC mean {shown['auc_mean']}, any {shown['auc_any']}; sensitivity(any) "
               f"{shown['sensitivity_any']}, specificity(any) {shown['specificity_any']} at 0.5",
               f"  log loss {shown['log_loss']}"]
        if self.ece_after is not None:
            out[-1] += (f" ({self.log_loss_before:.4f} before temperature scaling); ECE(any) "
                        f"{self.ece_before[-1]:.3f} -> {self.ece_after[-1]:.3f}")
        points = [p for p in self.operating if p.label == "any"]
        if points:
            out.append("  any at " + "; at ".join(
                f"{p.rule} threshold {p.threshold:.3f}: sensitivity "
                f"{with_interval(p.sensitivity, p.sensitivity_ci)}, specificity "
                f"{with_interval(p.specificity, p.specificity_ci)}" for p in points))
        return out

    def mlflow_metrics(self, prefix: str) -> dict[str, float]:
        """Finite values under `prefix` (e.g. "test_"), with `_ci_low` and `_ci_high` beside each."""
        values: dict[str, float] = {}
        for name, value in self.metrics.items():
            low, high = self.intervals.get(name, (math.nan, math.nan))
            for key, number in ((name, value), (f"{name}_ci_low", low), (f"{name}_ci_high", high)):
                if math.isfinite(number):
                    values[f"{prefix}{key}"] = float(number)
        if self.ece_after is not None:
            values[f"{prefix}log_loss_uncalibrated"] = self.log_loss_before
        for k, name in enumerate(CLASSES):
            values[f"{prefix}ece_{name}"] = (self.ece_after or self.ece_before)[k]
        for point in self.operating:
            for key in ("sensitivity", "specificity"):
                number = getattr(point, key)
                if math.isfinite(number):
                    values[f"{prefix}{key}_{point.label}_at_{point.rule}"] = float(number)
        return values


def with_interval(value: float, interval: tuple[float, float] | None) -> str:
    """`0.912 [0.893, 0.930]`; `-` for a value that does not exist."""
    if value is None or math.isnan(value):
        return "-"
    if interval is None or math.isnan(interval[0]):
        return f"{value:.4f}"
    return f"{value:.4f} [{interval[0]:.4f}, {interval[1]:.4f}]"


def assess(probs: np.ndarray, labels: np.ndarray, groups: np.ndarray, split: str,
           calibration: Calibration | None = None, resamples: int = bootstrap.RESAMPLES,
           seed: int = 0) -> Assessment:
    """Every figure of `probs` (raw model output) on `labels`, slices grouped into patients by `groups`."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    positive = labels == 1
    scaled = calibration.apply(probs) if calibration else probs
    codes, counts = bootstrap.patient_counts(groups, resamples, seed)
    intervals = bootstrap.intervals(bootstrap.resampled_metrics(scaled, labels, codes, counts))
    ece = [[expected_calibration_error(p[:, k], positive[:, k]) for k in range(len(CLASSES))]
           for p in (probs, scaled)]
    raw_log_loss, patients = compute_metrics(probs, labels)["log_loss"], int(codes.max()) + 1
    metrics = compute_metrics(scaled, labels)
    assessment = Assessment(split, len(probs), patients, resamples, metrics, intervals,
                            raw_log_loss, ece[0], ece[1] if calibration else None)
    if calibration:
        for rule in RULES:
            thresholds = np.asarray(calibration.thresholds[rule], dtype=np.float64)
            rates = bootstrap.resampled_rates(scaled, labels, np.nan_to_num(thresholds, nan=np.inf), codes,
                                              counts)
            bounds = {key: bootstrap.intervals({str(k): values[:, k] for k in range(len(CLASSES))})
                      for key, values in rates.items()}
            for k, name in enumerate(CLASSES):
                if math.isnan(thresholds[k]):
                    continue
                said, bleed = scaled[:, k] >= thresholds[k], positive[:, k]
                tally = {"tp": int((said & bleed).sum()), "fp": int((said & ~bleed).sum()),
                         "fn": int((~said & bleed).sum()), "tn": int((~said & ~bleed).sum())}
                found, healthy = tally["tp"] + tally["fn"], tally["fp"] + tally["tn"]
                assessment.operating.append(OperatingPoint(
                    name, rule, float(thresholds[k]), tally["tp"] / found if found else math.nan,
                    bounds["sensitivity"][str(k)], tally["tn"] / healthy if healthy else math.nan,
                    bounds["specificity"][str(k)], tally))
    return assessment


def html_page(title: str, assessment: Assessment, figures: dict[str, bytes], notes: list[str] = ()) -> str:
    """The evaluation report: metrics with intervals, operating points, calibration, figures."""
    page = Page(title)
    for note in notes:
        page.note(note)
    page.note(f"{assessment.split}: {assessment.slices} slices of {assessment.patients} patients. Intervals: "
              f"95% percentile intervals over {assessment.resamples} resamples of patients (slices of one "
              "patient are correlated, so patients, not slices, are drawn).")
    page.heading("Metrics")
    rows = [[name, with_interval(value, assessment.intervals.get(name))]
            for name, value in assessment.metrics.items() if not name.startswith("positives_")]
    page.table(["metric", "value [95% interval]"], rows)
    page.heading("Operating points (thresholds chosen on validation)")
    if assessment.operating:
        page.table(["class", "rule", "threshold", "sensitivity", "specificity", "TP", "FP", "FN", "TN"],
                   [[p.label, p.rule, f"{p.threshold:.4f}", with_interval(p.sensitivity, p.sensitivity_ci),
                     with_interval(p.specificity, p.specificity_ci), *p.counts.values()]
                    for p in assessment.operating])
    else:
        page.note("This model carries no thresholds (no calibration was fitted on validation).")
    page.heading("Calibration")
    header = ["class", "ECE"] + (["ECE after temperature scaling"] if assessment.ece_after else [])
    page.table(header, [[name, f"{assessment.ece_before[k]:.4f}",
                         *([f"{assessment.ece_after[k]:.4f}"] if assessment.ece_after else [])]
                        for k, name in enumerate(CLASSES)])
    if assessment.ece_after:
        page.note(f"Weighted log loss {assessment.log_loss_before:.4f} before temperature scaling, "
                  f"{assessment.metrics['log_loss']:.4f} after.")
    page.heading("Figures")
    for name, png in figures.items():
        page.figure(png, name)
    page.heading("All metrics")
    page.preformatted(format_metrics(assessment.metrics))
    return page.render()
