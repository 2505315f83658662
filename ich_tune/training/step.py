"""One optimizer step on a batch already on the device: the training loop's, and the one the
benchmarks time, so that what they measure is what training runs."""

from __future__ import annotations

import torch

from ich_tune.training.device import Placement
from ich_tune.training.optim import Loss


class NonFiniteLoss(ArithmeticError):
    """The loss is NaN or infinite; nothing was updated."""

    def __init__(self, loss: float) -> None:
        super().__init__(f"the training loss is {loss}")
        self.loss = loss


def optimizer_step(model: torch.nn.Module, loss_fn: Loss, optimizer: torch.optim.Optimizer,
                   placement: Placement, scaler: torch.amp.GradScaler, images: torch.Tensor,
                   labels: torch.Tensor, grad_clip: float | None = None) -> torch.Tensor:
    """Forward under `placement`'s autocast, loss, backward through `scaler`, gradients clipped to norm
    `grad_clip`, optimizer step. Returns the loss, detached, on the device.

    Only the check that the loss is finite waits for the GPU, and only for the forward pass.
    """
    with placement.autocast():
        loss = loss_fn(model(images).float(), labels)
    if not torch.isfinite(loss):
        raise NonFiniteLoss(loss.item())
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()
