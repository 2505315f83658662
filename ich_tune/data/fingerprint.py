"""The identity of a validation set, so that values measured on it compare only with values measured
on the same slices, labels and preprocessing (the registry's champion rule)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from ich_tune.config.schema import DataConfig
from ich_tune.data.channels import parse_channels
from ich_tune.data.prepare import load_splits


def data_fingerprint(cache_path: Path, data: DataConfig) -> str:
    """The validation data's identity: which slices (ids, labels) and how they were prepared (size,
    windows, neighbouring slices). Paths and file times are left out, so a copy of the data on
    another disk or machine has the same fingerprint."""
    splits = load_splits(cache_path, data, quiet=True)
    cache = splits.cache
    val = splits.val[cache.ids[splits.val].argsort()]
    identity = {"ids": cache.ids[val].astype(str).tolist(), "labels": cache.labels[val].tolist(),
                "size": data.size, "context": data.context,
                "channels": [dataclasses.asdict(c) for c in parse_channels(data.channels)]}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
