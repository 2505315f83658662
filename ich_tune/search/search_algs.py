"""The search algorithms a search may name: the grid (or random samples) in Ray's order, the grid
shuffled, or Optuna's TPE told which trials were pruned."""

from __future__ import annotations

import itertools
import random

from optuna.samplers import TPESampler
from ray.tune.search import SearchAlgorithm, Searcher
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch
from ray.tune.utils.util import unflatten_dict

from ich_tune.experiment import Search
from ich_tune.trials import DIVERGED, ENDED_KEY, ERROR


class PruningOptunaSearch(OptunaSearch):
    """Optuna hears of trials that ASHA stopped before their budget, and of diverged trials, as
    pruned (a bad region to learn from), and of trials that ended in an error as failed.

    OptunaSearch tells Optuna of a trial completed without a result as failed when it ended in an
    error, else as pruned: such trials are handed on without theirs."""

    def __init__(self, *args, budget: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.budget = budget

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result and not error:
            ended = result.get(ENDED_KEY)
            if ended == ERROR:
                result, error = None, True
            elif ended == DIVERGED or result.get("step", self.budget) < self.budget:
                result = None
        super().on_trial_complete(trial_id, result, error)


def make_search_alg(search: Search, budget: int) -> Searcher | SearchAlgorithm:
    """`budget` is every trial's step budget: a trial stopped short of it was pruned."""
    config = search.config
    if config.search_alg.name == "optuna":
        return PruningOptunaSearch(sampler=TPESampler(seed=config.search_alg.seed), budget=budget)
    shuffled = config.search_alg.name == "shuffled"
    # Tune applies max_concurrent_trials to Searchers (Optuna) only; the variant generator takes it itself
    return BasicVariantGenerator(random_state=config.search_alg.seed,
                                 max_concurrent=config.max_concurrent_trials or 0,
                                 points_to_evaluate=shuffled_grid(search) if shuffled else None)


def shuffled_grid(search: Search) -> list[dict]:
    """Every grid point, once per sample, in a random order (seeded): with the grid's own order, the
    first trials pass ASHA's rungs only because no one has reached them yet. Ray runs each point
    as one trial, so the search needs num_samples = len(points) (see trial_count)."""
    grid = [d for d in search.dimensions if d.kind == "grid_search"]
    # nested like the param space: {"optimizer": {"lr": 0.001}, ...}
    points = [unflatten_dict({d.path: value for d, value in zip(grid, values, strict=True)}, delimiter=".")
              for values in itertools.product(*(d.args for d in grid))]
    points *= search.config.num_samples
    random.Random(search.config.search_alg.seed).shuffle(points)
    return points


def trial_count(search: Search) -> int:
    """Tune's num_samples: a shuffled grid hands Ray each of its trials as a point of its own."""
    return search.num_trials if search.config.search_alg.name == "shuffled" else search.config.num_samples
