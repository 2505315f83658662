"""Where a model runs: the device, mixed precision and memory layout, decided in one place.

Training and prediction must agree on all three (a model trained in bf16 channels-last on a GPU is
fed the same way at prediction), so both build a Placement from the experiment's `train:` section.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ich_tune.config.schema import TrainConfig


@dataclass(frozen=True)
class Placement:
    device: torch.device
    half: torch.dtype | None  # autocast dtype; None runs in float32
    channels_last: bool

    def model(self, model: torch.nn.Module) -> torch.nn.Module:
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def images(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.half, enabled=self.half is not None)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for fp16, whose small gradients would underflow; a no-op otherwise."""
        return torch.amp.GradScaler("cuda", enabled=self.half == torch.float16)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """Mixed precision on CUDA only: bf16 where the GPU supports it, else fp16."""
    if device.type != "cuda" or setting == "off":
        return None
    if setting == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[setting]


def place(train: TrainConfig) -> Placement:
    """The best device for `train`'s settings; on CUDA, caps this process's memory at
    `train.cuda_memory_fraction` (a trial's GPU share: Ray's fractions are only bookkeeping)."""
    device = pick_device()
    if device.type == "cuda" and train.cuda_memory_fraction:
        torch.cuda.set_per_process_memory_fraction(train.cuda_memory_fraction, device)
    return Placement(device, amp_dtype(train.amp, device), device.type == "cuda" and train.channels_last)
