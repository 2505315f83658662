"""What a search shows while it runs. On a terminal: a table of its trials redrawn in place under a
header of counts, elapsed time and an ETA. Elsewhere (CI, nohup, a file): one line per trial event and
a summary line at most every 30 s. Either way a trial that diverges, fails or restarts gets one line
naming its log file.

Ray Tune's own status tables are off (driver.make_tuner); Tune's callback hooks bring the data, and a
trial's own output is in its trial.log (trial.py).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ray import cloudpickle, tune
from ray.tune.utils import unflattened_lookup
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ich_tune.search import storage
from ich_tune.trials import (
    DIVERGED,
    ENDED_KEY,
    FINISHED,
    STOPPED_EARLY,
    TRIAL_LOG,
    how_it_ended,
    one_line,
)

SUMMARY_EVERY = 30.0  # seconds between summary lines off a terminal
REDRAW_EVERY = 1.0  # seconds between redraws of the table on a terminal (events redraw at once)
RUNNING, PENDING, PAUSED, ERROR = "running", "pending", "paused", "error"
STATE_STYLES = {RUNNING: "bold", FINISHED: "green", DIVERGED: "red", ERROR: "red", PAUSED: "yellow"}


@dataclass
class Plan:
    """What the view knows of the search before it starts."""

    metric: str
    mode: str
    budget: int  # every trial's step budget
    dimensions: list[str]  # the searched keys, dotted
    total_trials: int
    run_dir: str  # a local folder or a URI: where the trials' log files are named
    rungs: list[float] = field(default_factory=list)  # ASHA's milestones below the budget
    reduction_factor: float = 1.0  # ASHA keeps one trial in this many at each rung


@dataclass
class TrialState:
    """One trial as the view shows it."""

    trial_id: str
    values: dict[str, Any]  # the searched values, by their short names
    step: int = 0
    latest: float | None = None  # the search metric at the latest validation
    best: float | None = None
    state: str = PENDING
    passed: int = 0  # rungs passed


def short_names(dimensions: list[str]) -> dict[str, str]:
    """Each searched key by its last part ("lr"), unless two keys end alike."""
    leaves = [path.rpartition(".")[2] for path in dimensions]
    names = leaves if len(set(leaves)) == len(leaves) else dimensions
    return dict(zip(dimensions, names, strict=True))


def duration(seconds: float) -> str:
    """`45s`, `3m20s`, `2h05m`."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def expected_steps(step: float, budget: int, rungs: list[float], reduction_factor: float) -> float:
    """The steps a trial at `step` can be expected to still train: to its next rung, then onwards only
    as often as ASHA keeps a trial at each rung (one in `reduction_factor`)."""
    remaining, survival, position = 0.0, 1.0, step
    for milestone in [*(r for r in rungs if r > step), budget]:
        remaining += survival * max(milestone - position, 0.0)
        position = milestone
        survival /= reduction_factor
    return remaining


def value(number: float | None) -> str:
    return "-" if number is None else f"{number:.4f}"


def header_line(plan: Plan, trials: list[TrialState], elapsed: float, eta: float | None) -> str:
    """Counts, elapsed time, ETA and the best trial so far, in one line."""
    running = sum(t.state == RUNNING for t in trials)
    done = sum(t.state not in (RUNNING, PENDING, PAUSED) for t in trials)
    pending = max(plan.total_trials - running - done, 0)
    parts = [f"{running} running, {pending} pending, {done} of {plan.total_trials} done",
             f"{duration(elapsed)} elapsed" + (f", about {duration(eta)} left" if eta is not None else "")]
    best = best_trial(plan.mode, trials)
    if best is not None:
        parts.append(f"best {plan.metric} {value(best.best)} ({best.trial_id})")
    return "search: " + " | ".join(parts)


def best_trial(mode: str, trials: list[TrialState]) -> TrialState | None:
    scored = [t for t in trials if t.best is not None]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda t: t.best)


def status_table(plan: Plan, trials: list[TrialState], elapsed: float, eta: float | None,
                 max_rows: int | None = None) -> Group:
    """The header line over the table: running trials first, then pending, then ended ones; rows past
    `max_rows` are counted in its last row."""
    names = short_names(plan.dimensions)
    header = Text(header_line(plan, trials, elapsed, eta), style="bold", no_wrap=True, overflow="ellipsis")
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ["trial", *names.values(), "step", plan.metric, "best", "state"]:
        table.add_column(column, justify="right" if column in ("step", plan.metric, "best") else "left")
    order = {RUNNING: 0, PAUSED: 1, PENDING: 2}
    rows = sorted(trials, key=lambda t: (order.get(t.state, 3), t.trial_id))
    shown = rows if max_rows is None or len(rows) <= max_rows else rows[:max(max_rows - 1, 0)]
    for t in shown:
        table.add_row(t.trial_id, *(_cell(t.values.get(name)) for name in names.values()),
                      f"{t.step}/{plan.budget}", value(t.latest), value(t.best), t.state,
                      style=STATE_STYLES.get(t.state, "dim" if t.state.startswith("stopped") else None))
    if len(shown) < len(rows):
        table.add_row(f"... {len(rows) - len(shown)} more", style="dim")
    return Group(header, table)


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


class LiveView(tune.Callback):
    """Tune's hooks to the console: a live table on a terminal (rich), event lines elsewhere.

    `file` is where it writes (default: stdout as it is when the search starts); `terminal` whether
    that is a terminal (default: asked of the file)."""

    def __init__(self, plan: Plan, file: TextIO | None = None, terminal: bool | None = None) -> None:
        self.plan = plan
        self.file, self.terminal = file, terminal
        self.trials: dict[str, TrialState] = {}
        self.started = self.last_summary = self.last_draw = time.monotonic()
        self.progressed = 0.0  # steps trained by all trials since the view started
        self._live: Live | None = None

    def __getstate__(self) -> dict:
        """Pickled with the Tuner's state; a --resume brings a view of its own (driver.make_tuner)."""
        return {**self.__dict__, "file": None, "_live": None}

    # -- Tune's hooks

    def setup(self, **info: Any) -> None:
        self.file = self.file or sys.stdout
        if self.terminal is None:
            self.terminal = self.file.isatty()
        self.started = self.last_summary = self.last_draw = time.monotonic()
        if self.terminal:
            self._live = Live(console=Console(file=self.file), auto_refresh=False, transient=True,
                              redirect_stdout=True, redirect_stderr=True)
            self._live.start()
            self._draw()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        state = self._track(trial)
        state.state = RUNNING
        values = " ".join(f"{name}={_cell(v)}" for name, v in state.values.items())
        self._event(f"trial {state.trial_id} started" + (f": {values}" if values else ""), quiet=True)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        state = self._track(trial)
        step = int(result.get("step", state.step))
        passed = sum(rung < step for rung in self.plan.rungs)  # it goes on past them
        if passed > state.passed and ENDED_KEY not in result:
            rung = self.plan.rungs[passed - 1]
            if state.step >= rung:  # its latest result was the one at the rung (not so on a resume)
                self._event(f"trial {state.trial_id} passed rung {passed} (step {rung:g}), "
                            f"{self.plan.metric} {value(state.latest)} there", quiet=True)
            state.passed = passed
        self.progressed += max(step - state.step, 0)
        state.step = max(step, state.step)
        metric = result.get(self.plan.metric)
        if ENDED_KEY not in result and isinstance(metric, (int, float)) and math.isfinite(metric):
            state.latest = float(metric)
            better = max if self.plan.mode == "max" else min
            state.best = state.latest if state.best is None else better(state.best, state.latest)
        self._draw()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        state = self._track(trial)
        last = trial.last_result or {}
        status, message = how_it_ended(last, self.plan.budget)
        step = int(last.get("step", state.step))
        if status == STOPPED_EARLY:
            rung = sum(r <= step for r in self.plan.rungs)
            state.state = f"stopped at rung {rung}" if rung else f"stopped at step {step}"
            self._event(f"trial {state.trial_id} {state.state} ({self.plan.metric} {value(state.latest)}, "
                        f"best {value(state.best)})", quiet=True)
        elif status == FINISHED:
            state.state = FINISHED
            self._event(f"trial {state.trial_id} finished: step {step}/{self.plan.budget}, "
                        f"{self.plan.metric} {value(state.latest)}, best {value(state.best)}", quiet=True)
        else:  # it ended itself: diverged, or out of memory
            state.state = status
            what = "diverged" if status == DIVERGED else f"failed at step {step}"  # divergence names its step
            self._event(f"trial {state.trial_id} {what}: {message} (log: {self.log_file(trial)})")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        state = self._track(trial)
        state.state = ERROR
        self._event(f"trial {state.trial_id} failed at step {state.step}: {_error(trial)} "
                    f"(log: {self.log_file(trial)})")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        state = self._track(trial)
        state.state = PENDING
        self._event(f"trial {state.trial_id} crashed at step {state.step}: {_error(trial)}; restarting "
                    f"from its last checkpoint (log: {self.log_file(trial)})")

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        for trial in trials:
            self._track(trial)
        now = time.monotonic()
        if self.terminal and now - self.last_draw >= REDRAW_EVERY:
            self._draw()
        elif not self.terminal and now - self.last_summary >= SUMMARY_EVERY:
            self.last_summary = now
            self._print(self.summary())

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.close()

    # -- what it shows

    def summary(self) -> str:
        return header_line(self.plan, list(self.trials.values()), self.elapsed(), self.eta())

    def table(self, max_rows: int | None = None) -> Group:
        return status_table(self.plan, list(self.trials.values()), self.elapsed(), self.eta(), max_rows)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def eta(self) -> float | None:
        """The seconds left: the steps the search can still be expected to train, at the rate its
        trials have trained so far together."""
        rate = self.progressed / max(self.elapsed(), 1e-9)
        if rate <= 0:
            return None
        plan = self.plan
        running = [t for t in self.trials.values() if t.state in (RUNNING, PAUSED, PENDING)]
        unseen = max(plan.total_trials - len(self.trials), 0)
        steps = sum(expected_steps(t.step, plan.budget, plan.rungs, plan.reduction_factor) for t in running)
        steps += unseen * expected_steps(0, plan.budget, plan.rungs, plan.reduction_factor)
        return steps / rate

    def log_file(self, trial: Any) -> str:
        """The trial's log file in the run folder, where Ray syncs the trial folders of this node."""
        return storage.join(self.plan.run_dir, Path(trial.path).name, TRIAL_LOG)

    def close(self) -> None:
        """The live table goes (the end-of-run summary follows it); safe to call twice."""
        if self._live is not None:
            self._live.stop()
            self._live = None

    def _track(self, trial: Any) -> TrialState:
        """The trial's state, made on first sight (also for the trials of a resumed search)."""
        state = self.trials.get(trial.trial_id)
        if state is None:
            names = short_names(self.plan.dimensions)
            values = {names[path]: unflattened_lookup(path, trial.config, delimiter=".", default=None)
                      for path in self.plan.dimensions}
            last = trial.last_result or {}
            state = TrialState(trial.trial_id, values, step=int(last.get("step", 0)))
            self.trials[trial.trial_id] = state
            if trial.status == "TERMINATED":
                state.state, _ = how_it_ended(last, self.plan.budget)
            elif trial.status in ("RUNNING", "PAUSED", "ERROR"):
                state.state = trial.status.lower()
        return state

    def _event(self, line: str, quiet: bool = False) -> None:
        """A trial event: its own line off a terminal; on one, a redraw, and a line above the table
        unless `quiet` (what the table shows anyway)."""
        if not self.terminal or not quiet:
            self._print(line)
        self._draw()

    def _print(self, line: str) -> None:
        if self._live is not None:
            self._live.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            print(line, file=self.file, flush=True)

    def _draw(self) -> None:
        if self._live is not None:
            self.last_draw = time.monotonic()
            height = self._live.console.size.height
            self._live.update(self.table(max_rows=max(height - 4, 3)), refresh=True)


def _error(trial: Any) -> str:
    """The trial's latest exception, its first line. Ray writes it to the trial's folder on this node
    before it calls the callbacks, and copies it to storage later."""
    written = Path(trial.pickled_error_file or "")
    error = cloudpickle.loads(written.read_bytes()) if written.is_file() else trial.get_error()
    return one_line(error)[:300] if error else "unknown error"
