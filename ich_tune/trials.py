"""How each trial of a search ended, ranked and shown the same way by `run` and `report`.

A trial ends in one of four ways: it ran its whole budget (finished), ASHA stopped it at a rung
(stopped early), its loss became NaN/inf (diverged), or it failed for good: out of memory, or a crash
that outlived its retries (error). Only the first two can provide the search's best model.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.tune import Checkpoint

FINISHED, STOPPED_EARLY, DIVERGED, ERROR = "finished", "stopped early", "diverged", "error"
COMPLETED = (FINISHED, STOPPED_EARLY)  # trials whose checkpoints are models worth keeping
ENDED_KEY = "ended"  # in a trial's last result: DIVERGED or ERROR when the trial ended itself
MESSAGE_KEY = "message"  # ... with the reason, one line
NODE_KEY = "node_id"  # in each trial result: the Ray node that trained it
TRIAL_LOG = "trial.log"  # in each trial's folder: everything its worker printed, tracebacks included
URI_SCHEMES = {"gcs": "gs"}  # pyarrow's filesystem names whose URI scheme differs


def worst(mode: str) -> float:
    """The search metric a trial reports when it gives up: the worst value there is, yet finite
    (ASHA takes percentiles of a rung's values, and one infinity would make them NaN)."""
    return -sys.float_info.max if mode == "max" else sys.float_info.max


def one_line(error: BaseException | str) -> str:
    """An exception as `Type: first line of its message`, for tables and tags."""
    if isinstance(error, str):
        text, name = error, ""
    else:
        cause = getattr(error, "cause", None)  # Ray wraps the trial's own exception
        error = cause if isinstance(cause, BaseException) else error
        text, name = str(error), type(error).__name__
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    return f"{name}: {first}" if name and not first.startswith(name) else first or name


def how_it_ended(last_result: dict, budget: int, error: BaseException | None = None) -> tuple[str, str]:
    """(status, message) of a trial from its last result, and Ray's error if it failed for good."""
    if error is not None:
        return ERROR, one_line(error)
    if isinstance(last_result.get(ENDED_KEY), str):
        return last_result[ENDED_KEY], last_result.get(MESSAGE_KEY, "")
    return (STOPPED_EARLY if last_result.get("step", 0) < budget else FINISHED), ""


@dataclass
class TrialOutcome:
    trial_id: str
    status: str  # FINISHED, STOPPED_EARLY, DIVERGED or ERROR
    steps: int
    best: float  # the best value of the search metric over its validations; NaN if none
    params: dict[str, Any]  # the searched dimensions' values
    message: str = ""  # why it diverged or failed
    seed: int | None = None
    config: dict | None = None
    history: list[dict] = field(default_factory=list)
    checkpoint: Checkpoint | None = None  # the best checkpoint, where Ray kept one (maybe in a bucket)
    versus_best: str = ""  # tied, worse or better than the best by a paired bootstrap ("" if not compared)


def checkpoint_uri(checkpoint: Checkpoint) -> str:
    """Where a Ray checkpoint lives: its folder, or `s3://bucket/...` (`gs://`, ...) for a bucket."""
    kind = checkpoint.filesystem.type_name
    if kind == "local":
        return checkpoint.path
    return f"{URI_SCHEMES.get(kind, kind)}://{checkpoint.path}"


def ranked(outcomes: list[TrialOutcome], mode: str) -> list[TrialOutcome]:
    """Best first by the search metric; trials that never validated last."""
    sign = -1.0 if mode == "max" else 1.0
    return sorted(outcomes, key=lambda t: (math.isnan(t.best), sign * t.best if not math.isnan(t.best)
                                           else 0.0, t.trial_id))


def best_of(outcomes: list[TrialOutcome], mode: str) -> TrialOutcome | None:
    """The best completed trial that kept a checkpoint."""
    eligible = [t for t in outcomes if t.status in COMPLETED and t.checkpoint and not math.isnan(t.best)]
    return ranked(eligible, mode)[0] if eligible else None


def table(outcomes: list[TrialOutcome], metric: str, mode: str) -> str:
    """Aligned columns: trial, the searched values, steps, best metric, how it ended (and why)."""
    if not outcomes:
        return "(no trials)"
    params = sorted({key for t in outcomes for key in t.params})
    compared = any(t.versus_best for t in outcomes)
    header = ["trial", *params, "steps", f"best {metric}", *(["vs best"] if compared else []), "ended"]
    rows = [[t.trial_id, *(_cell(t.params.get(p)) for p in params), str(t.steps),
             "-" if math.isnan(t.best) else f"{t.best:.4f}", *([t.versus_best or "-"] if compared else []),
             f"{t.status}: {t.message}" if t.message else t.status] for t in ranked(outcomes, mode)]
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                     for row in [header, *rows])


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)
