"""The original's fully convolutional ResNet: 3x3 and 1x1 kernels only, global average head.

Having no layer tied to the input size is what lets weights trained at 256x256 start a 512x512 run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ich_tune.config.schema import ModelConfig, bounded
from ich_tune.models import register

POOLINGS = ("max", "avg", "conv")


@dataclass
class ResNetConfig(ModelConfig):
    hidden_dims: list[int] = field(default_factory=lambda: [128, 128, 128, 128],
                                   metadata={"low": 1, "nonempty": True})  # widths of the stages
    blocks_per_stage: int = bounded(1, 1)
    pooling: Literal["max", "avg", "conv"] = "max"
    stem_stride: int = bounded(1, 1, 8)
    dropout: float = bounded(0.4, 0.0, 0.99)


def conv_bn(in_dim: int, out_dim: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    """Convolution without bias (the BatchNorm after it has one) followed by BatchNorm."""
    conv = nn.Conv2d(in_dim, out_dim, kernel_size, stride, padding=kernel_size // 2, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out_dim))


class BasicBlock(nn.Module):
    """3x3-BN-ReLU-3x3-BN plus a shortcut: identity, or a 1x1 projection when the width changes."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(in_dim, out_dim, 3)
        self.conv2 = conv_bn(out_dim, out_dim, 3)
        self.shortcut = nn.Identity() if in_dim == out_dim else conv_bn(in_dim, out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(torch.relu(self.conv1(x)))
        return torch.relu(out + self.shortcut(x))


def downsample(pooling: str, dim: int) -> nn.Module:
    """Halve height and width between stages."""
    if pooling == "max":
        return nn.MaxPool2d(2)
    if pooling == "avg":
        return nn.AvgPool2d(2)
    if pooling == "conv":
        return nn.Sequential(conv_bn(dim, dim, 3, stride=2), nn.ReLU())
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


@register(ResNetConfig)
class ResNetClassifier2d(nn.Module):
    """Stem, residual stages separated by 2x downsampling, dropout, 1x1 conv head, global mean.

    Inputs must be at least stem_stride * 2 ** (len(hidden_dims) - 1) pixels on each side.
    Dropout2d drops whole feature maps; because the 1x1 head and the global mean commute, this is
    the usual dropout on the pooled features of a classifier.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int = 6,
        hidden_dims: Sequence[int] = (128, 128, 128, 128),
        blocks_per_stage: int = 1,
        pooling: str = "max",
        stem_stride: int = 1,
        dropout: float = 0.4,
    ) -> None:
        super().__init__()
        if not hidden_dims:
            raise ValueError("hidden_dims needs at least one width")
        if blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be >= 1, got {blocks_per_stage}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.stem = nn.Sequential(conv_bn(in_channels, hidden_dims[0], 3, stem_stride), nn.ReLU())
        stages = []
        in_dim = hidden_dims[0]
        for index, dim in enumerate(hidden_dims):
            layers = [downsample(pooling, in_dim)] if index > 0 else []
            for _ in range(blocks_per_stage):
                layers.append(BasicBlock(in_dim, dim))
                in_dim = dim
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.dropout = nn.Dropout2d(dropout)
        self.head = nn.Conv2d(in_dim, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] images -> [B, num_classes] logits."""
        features = self.stages(self.stem(x))
        return self.head(self.dropout(features)).mean(dim=(2, 3))
