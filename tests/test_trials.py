"""How trials ended, ranked the same way everywhere, with the mode known rather than guessed."""

import math
import sys
from pathlib import Path

import numpy as np

from ich_tune.trials import TrialOutcome, best_of, how_it_ended, one_line, ranked, table, worst


def outcome(trial_id: str, status: str, best: float, checkpoint: bool = True) -> TrialOutcome:
    return TrialOutcome(trial_id, status, steps=10, best=best, params={"optimizer.lr": 0.1},
                        checkpoint=Path("c.pt") if checkpoint else None)


def test_ranking_follows_the_mode_and_puts_trials_without_a_value_last():
    trials = [outcome("a", "finished", 0.3), outcome("b", "diverged", math.nan),
              outcome("c", "stopped early", 0.1), outcome("d", "finished", 0.2)]
    assert [t.trial_id for t in ranked(trials, "min")] == ["c", "d", "a", "b"]
    assert [t.trial_id for t in ranked(trials, "max")] == ["a", "d", "c", "b"]


def test_only_completed_trials_with_a_checkpoint_can_be_the_best():
    trials = [outcome("error", "error", 0.99), outcome("diverged", "diverged", 0.98),
              outcome("no-checkpoint", "finished", 0.97, checkpoint=False),
              outcome("stopped", "stopped early", 0.90), outcome("finished", "finished", 0.80)]
    assert best_of(trials, "max").trial_id == "stopped"
    assert best_of(trials[:3], "max") is None


def test_how_a_trial_ended():
    assert how_it_ended({"step": 100}, budget=100) == ("finished", "")
    assert how_it_ended({"step": 30}, budget=100) == ("stopped early", "")
    assert how_it_ended({"step": 3, "ended": "diverged", "message": "step 3: nan"}, 100) == (
        "diverged", "step 3: nan")
    assert how_it_ended({"step": 30}, 100, RuntimeError("worker died\nTraceback ...")) == (
        "error", "RuntimeError: worker died")


def test_one_line_takes_the_cause_ray_wraps():
    class Wrapped(Exception):
        cause = MemoryError("Unable to allocate 8.00 GiB")

    wrapped = Wrapped("ray::ImplicitFunc.train()\n  File ...")
    assert one_line(wrapped) == "MemoryError: Unable to allocate 8.00 GiB"
    assert one_line("\n\n  first line\nsecond") == "first line"


def test_the_worst_value_is_finite_so_rung_percentiles_stay_numbers():
    assert worst("max") == -sys.float_info.max and worst("min") == sys.float_info.max
    assert math.isfinite(float(np.nanpercentile([worst("max"), 0.9, 0.8], 50)))


def test_table_shows_the_searched_values_and_why_a_trial_ended():
    text = table([outcome("a", "finished", 0.25), outcome("b", "diverged", math.nan)], "val_log_loss", "min")
    header, first, second = text.splitlines()
    assert header.split() == ["trial", "optimizer.lr", "steps", "best", "val_log_loss", "ended"]
    assert first.split() == ["a", "0.1", "10", "0.2500", "finished"]
    assert second.split() == ["b", "0.1", "10", "-", "diverged"]
