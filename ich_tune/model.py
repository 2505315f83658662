"""The original's fully convolutional ResNet: 3x3 and 1x1 kernels only, global average head.

Having no layer tied to the input size is what lets weights trained at 256x256 start a 512x512 run.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ich_tune.config.schema import ModelConfig
from ich_tune.errors import UserError

POOLINGS = ("max", "avg", "conv")


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


def build_model(cfg: ModelConfig, in_channels: int) -> ResNetClassifier2d:
    """The network an experiment's `model` section describes (init_from is the caller's job)."""
    return ResNetClassifier2d(
        in_channels=in_channels,
        num_classes=cfg.num_classes,
        hidden_dims=cfg.hidden_dims,
        blocks_per_stage=cfg.blocks_per_stage,
        pooling=cfg.pooling,
        stem_stride=cfg.stem_stride,
        dropout=cfg.dropout,
    )


def count_parameters(model: nn.Module) -> int:
    """Number of learnable scalars (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters())


def load_weights(model: nn.Module, path: str | Path) -> int:
    """Copy every tensor of a weights file into `model`; returns how many were loaded.

    Accepts a plain state_dict or a checkpoint dict holding one under "model". Any missing,
    unexpected or differently shaped tensor is a UserError naming the file and the tensor, since a
    partial load would silently train from a half-random start.
    """
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise UserError(f"{path}: weights file not found.") from err
    except Exception as err:  # unpickling errors have no common base class
        raise UserError(f"{path}: not a readable PyTorch weights file ({_load_problem(path, err)}); "
                        "give the weights.pt that `train` or a search saved.") from err
    state = saved.get("model", saved) if isinstance(saved, Mapping) else saved
    if not isinstance(state, Mapping):
        raise UserError(f"{path}: expected a state_dict or a checkpoint with a 'model' entry, "
                        f"found {type(state).__name__}.")
    _check_matches(state, model.state_dict(), path)
    model.load_state_dict(state)
    return len(state)


def _check_matches(
    state: Mapping[str, object], expected: Mapping[str, torch.Tensor], path: str | Path
) -> None:
    for name, tensor in expected.items():
        if name not in state:
            raise UserError(f"{path}: tensor '{name}' (shape {tuple(tensor.shape)}) is missing; "
                            "the file was saved from a different model configuration.")
        found = state[name]
        if not isinstance(found, torch.Tensor):
            raise UserError(f"{path}: entry '{name}' is a {type(found).__name__}, not a tensor.")
        if found.layout != torch.strided or found.is_quantized or found.is_complex():
            raise UserError(f"{path}: tensor '{name}' is a {found.layout} {found.dtype} tensor; "
                            "expected plain real-valued weights.")
        if found.shape != tensor.shape:
            raise UserError(f"{path}: tensor '{name}' has shape {tuple(found.shape)} in the file "
                            f"but {tuple(tensor.shape)} in the model; check model.hidden_dims, "
                            "blocks_per_stage, pooling, num_classes and the input channels.")
    for name in state:
        if name not in expected:
            raise UserError(f"{path}: tensor '{name}' has no place in this model; "
                            "the file was saved from a different model configuration.")


def _load_problem(path: str | Path, err: Exception) -> str:
    """torch.load's reason in a few words: its own messages run to paragraphs of advice."""
    if isinstance(err, IsADirectoryError):
        return "a folder, not a file"
    if Path(path).is_file() and Path(path).stat().st_size == 0:
        return "the file is empty"
    if isinstance(err, pickle.UnpicklingError):
        return "it holds more than tensors and plain containers, or is damaged"
    if isinstance(err, OSError) and not isinstance(err, PermissionError):  # seeks past a cut-off end
        return f"truncated or damaged: {err.strerror or err}"
    return str(err).split(". ")[0].splitlines()[0][:120] if str(err) else type(err).__name__
