"""A trained model's metrics on the experiment's own labelled data."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from ich_tune.config.schema import ExperimentConfig
from ich_tune.data.cache import open_cache
from ich_tune.data.loader import validation_batches
from ich_tune.data.neighbours import with_neighbours
from ich_tune.data.prepare import load_splits, prepare_cache
from ich_tune.data.split import patient_groups
from ich_tune.evaluation.metrics import compute_metrics
from ich_tune.predict.scoring import batch_size_for, run_model
from ich_tune.progress import bar

SPLITS = ("val", "all")


def evaluate_split(model: torch.nn.Module, config: ExperimentConfig, split: str = "val",
                   batch_size: int | None = None) -> dict[str, float]:
    """`compute_metrics` on the experiment's labelled data: its validation split (the patients
    training held out, split as training split them) or, with split "all", every decoded slice."""
    probs, labels, _ = predict_split(model, config, split, batch_size)
    return compute_metrics(probs, labels)


def predict_split(model: torch.nn.Module, config: ExperimentConfig, split: str = "val",
                  batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The model's probabilities on a split, its labels, and each slice's patient (for intervals)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    cache_path = prepare_cache(config.data)
    if split == "val":
        splits = load_splits(cache_path, config.data)
        cache, indices = splits.cache, splits.val
    else:
        cache = with_neighbours(open_cache(cache_path), config.data.context)
        indices = np.flatnonzero(cache.valid)
    progress = bar(len(indices), f"evaluate ({split})")
    batches = validation_batches(cache, indices, batch_size_for(batch_size, config))
    probs, labels = run_model(model, config, _counted(batches, progress))
    progress.close()
    return probs, labels, patient_groups(cache.patient_ids[indices], cache.study_uids[indices])


def _counted(batches: Iterable, progress: tqdm) -> Iterator:
    for images, labels in batches:
        yield images, labels
        progress.update(len(images))
