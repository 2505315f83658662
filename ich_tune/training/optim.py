"""Loss, optimiser and learning-rate schedule, each built from its config section."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR

from ich_tune.config.schema import OptimizerConfig, ScheduleConfig
from ich_tune.evaluation.metrics import COMPETITION_WEIGHTS

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def mse_on_probabilities(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The original's objective: squared error of sigmoid probabilities (bounded, hence stable)."""
    return F.mse_loss(torch.sigmoid(logits), targets)


def bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on logits, every class weighted alike."""
    return F.binary_cross_entropy_with_logits(logits, targets)


def weighted_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The competition's log loss as a training loss: `any` weighs 2, each subtype 1."""
    weights = torch.as_tensor(COMPETITION_WEIGHTS, dtype=logits.dtype, device=logits.device)
    per_class = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return (per_class * weights).sum(dim=-1).mean() / weights.sum()


LOSSES: dict[str, Loss] = {"mse": mse_on_probabilities, "bce": bce, "weighted_bce": weighted_bce}


def make_loss(objective: str) -> Loss:
    """The loss function named by `loss.objective`; it takes logits and float 0/1 targets."""
    if objective not in LOSSES:
        raise ValueError(f"unknown loss objective {objective!r}; choose one of {sorted(LOSSES)}")
    return LOSSES[objective]


def make_optimizer(
    cfg: OptimizerConfig, params: Iterable[torch.nn.Parameter]
) -> torch.optim.Optimizer:
    """Adam (the original: L2 penalty in the gradient), AdamW (decoupled decay) or SGD+momentum."""
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=False)
    raise ValueError(f"unknown optimizer {cfg.name!r}; choose adam, adamw or sgd")


def lr_factor(step: int, warmup_steps: int, total_steps: int, decay: str) -> float:
    """Multiplier of the base lr for the optimizer step numbered `step` (0 = the first one).

    Warmup: steps 0 .. warmup_steps-1 use (step + 1) / warmup_steps, so step 0 already learns a
    little and step warmup_steps-1 uses the full lr. After it, "constant" keeps 1 and "cosine"
    falls along half a cosine from 1 at step warmup_steps to 0 at step total_steps (and stays 0).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_lr_schedule(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int
) -> LambdaLR:
    """Warmup then constant or cosine decay; call `.step()` after every optimizer step.

    Only the step count lives in `state_dict()`, so a resumed run rebuilds the same schedule from
    its config and continues where it stopped.
    """
    if cfg.decay not in ("constant", "cosine"):
        raise ValueError(f"unknown decay {cfg.decay!r}; choose constant or cosine")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup_steps, decay = cfg.warmup_steps, cfg.decay
    return LambdaLR(optimizer, lambda step: lr_factor(step, warmup_steps, total_steps, decay))
