"""What of a trial MLflow keeps: its config as params and its own metrics, the same names on each
trial's run (callback) and on the search's parent run for the best trial (publish)."""

from __future__ import annotations

import math
from typing import Any

from mlflow.entities import Param
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"model": {"dropout": 0.1}} -> {"model.dropout": 0.1}, keys in the tree's order (Ray's
    flatten_dict, deprecated, puts nested keys last)."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_params(config: dict) -> list[Param]:
    """One param per dotted key of a trial's config, each value cut to the length MLflow accepts."""
    return [Param(key, str(value)[:MAX_PARAM_VAL_LENGTH]) for key, value in flatten(config).items()]


def numeric(result: dict) -> dict[str, float]:
    """The reported numbers worth keeping: our metrics, not Ray's bookkeeping or text."""
    keep = {}
    for key, value in result.items():
        if (key.startswith("val_") or key in ("epoch", "seed", "diverged", "time_total_s")) and \
                isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            keep[key] = float(value)
    return keep
