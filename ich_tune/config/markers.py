"""Search dimensions written in YAML (`grid_search: [..]`, `uniform: {lower, upper}`, ...).

A marker is a mapping with exactly one marker key, anywhere in an experiment tree. It is checked
here, so a bad range fails before Ray starts, and compiled to a Ray Tune domain only when a search
runs (importing Ray costs seconds that `show-config` does not need).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

from ich_tune.config.schema import Origins, where
from ich_tune.errors import ConfigError

LISTS = ("grid_search", "choice")
# marker -> (required arguments, optional arguments); ranges follow ray.tune's functions.
RANGES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "uniform": (("lower", "upper"), ()),
    "quniform": (("lower", "upper", "q"), ()),
    "loguniform": (("lower", "upper"), ("base",)),
    "qloguniform": (("lower", "upper", "q"), ("base",)),
    "randint": (("lower", "upper"), ()),  # upper excluded, as in tune.randint
    "qrandint": (("lower", "upper", "q"), ()),  # upper included, as in tune.qrandint
    "lograndint": (("lower", "upper"), ("base",)),
    "qlograndint": (("lower", "upper", "q"), ("base",)),
    "randn": (("mean", "sd"), ()),
    "qrandn": (("mean", "sd", "q"), ()),
}
MARKERS = (*LISTS, *RANGES)
INTEGER_RANGES = ("randint", "qrandint", "lograndint", "qlograndint")


@dataclass(frozen=True)
class Dimension:
    path: str  # dotted key path in the experiment tree
    kind: str  # a marker name
    args: Any  # the list for grid_search/choice, else the argument mapping

    def candidates(self) -> list:
        """Values a trial may see at the edges of the dimension, to type-check before a search."""
        if self.kind in LISTS:
            return list(self.args)
        if "mean" in self.args:
            return [self.args["mean"]]
        upper = self.args["upper"] - 1 if self.kind == "randint" else self.args["upper"]
        return [self.args["lower"], upper]

    def describe(self) -> str:
        if self.kind in LISTS:
            return f"{self.kind} {list(self.args)}"
        return f"{self.kind}(" + ", ".join(f"{k}={v}" for k, v in self.args.items()) + ")"

    def to_tune(self) -> Any:
        from ray import tune

        if self.kind == "grid_search":
            return tune.grid_search(list(self.args))
        if self.kind == "choice":
            return tune.choice(list(self.args))
        return getattr(tune, self.kind)(**self.args)


def find_dimensions(tree: Any, origins: Origins, path: str = "") -> list[Dimension]:
    """Every marker in the tree, checked, in file order."""
    if isinstance(tree, dict):
        if any(k in MARKERS for k in tree):
            return [_check(tree, origins, path)]
        found = []
        for key, value in tree.items():
            found += find_dimensions(value, origins, f"{path}.{key}" if path else str(key))
        return found
    return []


def _check(node: dict, origins: Origins, path: str) -> Dimension:
    at = where(path, origins)
    if len(node) != 1:
        others = ", ".join(str(k) for k in node)
        raise ConfigError(f"{at}: a search marker must be the only key of its mapping "
                          f"(found {others}). Move the other keys out or drop the marker.")
    kind, args = next(iter(node.items()))
    if kind in LISTS:
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{at}: '{kind}' needs a non-empty list of values, got {args!r}.")
        return Dimension(path, kind, tuple(args))
    required, optional = RANGES[kind]
    if not isinstance(args, dict):
        spelled = ", ".join(f"{k}: .." for k in required)
        raise ConfigError(f"{at}: '{kind}' takes a mapping {{{spelled}}}, got {args!r}.")
    missing = [k for k in required if k not in args]
    extra = [k for k in args if k not in required + optional]
    if missing or extra:
        raise ConfigError(f"{at}: '{kind}' takes {', '.join(required + optional)}"
                          + (f"; missing {', '.join(missing)}" if missing else "")
                          + (f"; unknown {', '.join(map(str, extra))}" if extra else "") + ".")
    for key, value in args.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{at}: '{kind}.{key}' must be a number, got {value!r}.")
        if kind in INTEGER_RANGES and key != "base" and not isinstance(value, int):
            raise ConfigError(f"{at}: '{kind}.{key}' must be an integer, got {value!r}.")
    if "lower" in args and args["lower"] >= args["upper"]:
        raise ConfigError(f"{at}: '{kind}' needs lower < upper, got lower={args['lower']}, "
                          f"upper={args['upper']}.")
    if "log" in kind and args["lower"] <= 0:
        raise ConfigError(f"{at}: '{kind}' samples on a log scale, so it needs lower > 0, got "
                          f"{args['lower']}. Give a positive lower bound, or use "
                          f"'{kind.replace('log', '')}' for a linear scale.")
    for key in ("q", "sd", "base"):
        if key in args and args[key] <= 0:
            raise ConfigError(f"{at}: '{kind}.{key}' must be positive, got {args[key]}.")
    return Dimension(path, kind, dict(args))


def substitute(tree: dict, values: dict[str, Any]) -> dict:
    """A copy of the tree with the markers at the given paths replaced by values."""
    out = copy.deepcopy(tree)
    for path, value in values.items():
        *parents, last = path.split(".")
        node = out
        for key in parents:
            node = node[key]
        node[last] = value
    return out


def grid_points(dimensions: list[Dimension]) -> int:
    return math.prod(len(d.args) for d in dimensions if d.kind == "grid_search")


def to_param_space(tree: dict, dimensions: list[Dimension]) -> dict:
    """The tree with every marker replaced by its Ray Tune domain: a Tuner's param_space."""
    return substitute(tree, {d.path: d.to_tune() for d in dimensions})
