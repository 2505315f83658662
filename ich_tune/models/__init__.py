"""Model families by name.

A family is one module in this package: its network (an nn.Module built as `Network(in_channels,
**arguments)`) and the dataclass of its own arguments (a ModelConfig), joined by `@register`.
Experiments name the family in `model.name`; the config schema checks the family's own arguments;
checkpoints record both. Nothing else in the code knows which families exist.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

from torch import nn

from ich_tune.config import schema
from ich_tune.config.schema import ModelConfig

FAMILIES: dict[str, tuple[type[nn.Module], type[ModelConfig]]] = {}  # name -> (network, arguments)


def register(arguments: type[ModelConfig]):
    """Class decorator: the network is the family named after its class, taking these arguments."""
    def add(network: type[nn.Module]) -> type[nn.Module]:
        FAMILIES[network.__name__] = (network, arguments)
        schema.MODEL_FAMILIES[network.__name__] = arguments  # what the config language checks
        return network
    return add


def arguments(config: ModelConfig) -> dict:
    """The constructor arguments of a model config (its fields less `name` and `init_from`)."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in ("name", "init_from")}


def build_model(config: ModelConfig, in_channels: int) -> nn.Module:
    """The network an experiment's `model` section describes (init_from is the caller's job)."""
    network, _ = FAMILIES[config.name]
    return network(in_channels, **arguments(config))


def count_parameters(model: nn.Module) -> int:
    """Number of learnable scalars (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters())


for _module in pkgutil.iter_modules(__path__):  # each family registers itself on import
    importlib.import_module(f"{__name__}.{_module.name}")
