"""From `data:` settings to training and validation indices into an opened cache."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock

from ich_tune.config.schema import DataConfig
from ich_tune.data.cache import ensure_cache, open_cache
from ich_tune.data.neighbours import NeighbourCache, with_neighbours
from ich_tune.data.rsna import LABELS_CSV
from ich_tune.data.split import describe_split, group_codes, patient_groups, split_by_group
from ich_tune.data.synthetic import generate
from ich_tune.errors import DataError

log = logging.getLogger(__name__)


def resolve_root(cfg: DataConfig) -> Path:
    """The dataset folder; synthetic data are generated into it first when it has none."""
    if cfg.root is None:
        raise DataError("data.root is not set: pass --data-root /path/to/rsna (the folder with "
                        f"stage_2_train/ and {LABELS_CSV}) or set data.synthetic to generate data.")
    root = Path(cfg.root).expanduser()
    if (root / LABELS_CSV).is_file():
        return root
    if cfg.synthetic is None:
        raise DataError(f"{root}: no {LABELS_CSV} there. Point data.root (or --data-root) at the "
                        "Kaggle RSNA folder, or write synthetic data with `python -m ich_tune demo-data "
                        f"--out {root}`.")
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(root.parent / f".{root.name}.lock"):
        if not (root / LABELS_CSV).is_file():
            s = cfg.synthetic
            log.info(f"data: writing synthetic RSNA-layout data to {root} ({s.studies} studies x "
                     f"{s.slices} slices, {s.size}px, seed {s.seed})")
            generate(root, studies=s.studies, slices=s.slices, size=s.size, seed=s.seed,
                     positive_rate=s.positive_rate, quirk_rate=s.quirk_rate, difficulty=s.difficulty)
    return root


def prepare_cache(cfg: DataConfig, rescan: bool = False) -> Path:
    """Generate (synthetic only) and preprocess as needed; returns the cache folder. `rescan` checks
    every file rather than trusting an unchanged folder (see cache.ensure_cache)."""
    return ensure_cache(cfg, resolve_root(cfg), rescan)


@dataclass
class Splits:
    cache: NeighbourCache  # with the neighbours of data.context
    train: np.ndarray  # slice indices into the cache
    val: np.ndarray


def load_splits(cache_path: Path, cfg: DataConfig, quiet: bool = False) -> Splits:
    """Open the cache with its neighbour table for data.context and split its decodable slices by
    patient, saying what each part holds unless `quiet` (for a reader of the split alone)."""
    cache = with_neighbours(open_cache(cache_path), cfg.context)
    valid = np.flatnonzero(cache.valid)
    groups = group_codes(patient_groups(cache.patient_ids[valid], cache.study_uids[valid]))
    train, val = split_by_group(groups, cfg.train_fraction, cfg.split_seed, cfg.folds, cfg.fold)
    if len(train) == 0 or len(val) == 0:
        raise DataError(f"{cache_path}: {len(np.unique(groups))} patients cannot be split into "
                        "training and validation; use more data or another data.train_fraction.")
    if not quiet:
        for name, part in (("train", train), ("val", val)):
            log.info(describe_split(name, cache.labels[valid[part]], groups[part]))
    return Splits(cache, valid[train], valid[val])
