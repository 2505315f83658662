"""The trial schedulers a search may name: ASHA on training steps, the median stopping rule, FIFO."""

from __future__ import annotations

import math

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule, TrialScheduler

from ich_tune.config.schema import SearchConfig


def make_scheduler(config: SearchConfig, budget: int) -> TrialScheduler:
    """`budget` is every trial's step budget: ASHA's max_t."""
    if config.scheduler.name == "fifo":
        return FIFOScheduler()
    if config.scheduler.name == "median":
        # without time-slicing: a trial with too few peers to compare with runs on, where Ray's default
        # would pause it for pending trials (and a paused trial restarts from its checkpoint in a new
        # process); an infinite slice never ends, so no trial ever yields
        return MedianStoppingRule(time_attr="step", grace_period=config.scheduler.grace_period,
                                  min_time_slice=math.inf)
    return ASHAScheduler(time_attr="step", max_t=budget, grace_period=config.scheduler.grace_period,
                         reduction_factor=config.scheduler.reduction_factor)


def rungs(config: SearchConfig, budget: int) -> list[float]:
    """The steps at which ASHA compares a trial with its peers and stops the worse ones, lowest first,
    as Ray's ASHA places them (below the budget); none for the other schedulers."""
    if config.scheduler.name != "asha":
        return []
    grace, factor = config.scheduler.grace_period, config.scheduler.reduction_factor
    count = int(math.log(budget / grace) / math.log(factor) + 1)
    return [grace * factor**k for k in range(count) if grace * factor**k < budget]
