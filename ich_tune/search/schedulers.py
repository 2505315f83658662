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
