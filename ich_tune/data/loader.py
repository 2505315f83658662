"""Batches from the cache: shuffled training batches, a fixed validation order.

Batches are gathered straight from the memory-mapped array in the training process (a sorted
fancy index: sequential page reads, one copy). No worker processes: with decoding done once,
this is faster than pickling batches between processes, and trials sharing a machine stay light.
A cache opened with its neighbour table (`neighbours.with_neighbours`, for `data.context`) gives each
slice with its neighbours as extra channels, in the order neighbours.py describes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ich_tune.data.cache import Cache
from ich_tune.data.neighbours import NeighbourCache, stack_neighbours


def to_float(batch: torch.Tensor) -> torch.Tensor:
    """The model input: uint8 windows become [0, 1]; float16 HU is only widened."""
    if batch.dtype == torch.uint8:
        return batch.float().div_(255.0)
    if batch.is_floating_point():
        return batch.float()
    raise TypeError(f"expected a uint8 or floating point batch, got {batch.dtype}")


def gather(cache: Cache, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (storage dtype; with their neighbours for a NeighbourCache) and float labels for the
    given slice indices."""
    order = np.sort(indices)
    rows = cache.neighbours[order] if isinstance(cache, NeighbourCache) else order[:, None]
    labels = cache.labels[order].astype(np.float32)
    return torch.from_numpy(stack_neighbours(cache.images, rows)), torch.from_numpy(labels)


class TrainBatches:
    """An endless iterator of training batches: a fresh shuffle every epoch, last partial batch dropped.

    With `balanced`, slices are drawn with weights that give every class (and "no bleed") the same
    expected share, instead of shuffling each slice once per epoch. `state()` captures the position
    inside the epoch, so a resumed run draws exactly the batches an uninterrupted one would.
    """

    def __init__(self, cache: Cache, indices: np.ndarray, batch_size: int, seed: int,
                 balanced: bool = False, augment: bool = False) -> None:
        if len(indices) < batch_size:
            raise ValueError(f"{len(indices)} training slices cannot fill a batch of {batch_size}")
        self.cache, self.indices, self.batch_size = cache, indices, batch_size
        self.augment = augment
        self.order_rng = np.random.default_rng([seed, 0])
        self.augment_rng = np.random.default_rng([seed, 1])
        self.weights = class_balanced_weights(cache.labels[indices]) if balanced else None
        self.batches_per_epoch = len(indices) // batch_size
        self.epoch_start = self.order_rng.bit_generator.state
        self.order = self._draw_order()
        self.position = 0

    def _draw_order(self) -> np.ndarray:
        if self.weights is not None:
            size = self.batches_per_epoch * self.batch_size
            return self.order_rng.choice(len(self.indices), size=size, p=self.weights)
        return self.order_rng.permutation(len(self.indices))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position == self.batches_per_epoch:
            self.epoch_start = self.order_rng.bit_generator.state
            self.order = self._draw_order()
            self.position = 0
        start = self.position * self.batch_size
        chosen = self.indices[self.order[start:start + self.batch_size]]
        self.position += 1
        images, labels = gather(self.cache, chosen)
        return (random_flip_affine(images, self.augment_rng) if self.augment else images), labels

    def state(self) -> dict:
        """Where the sampler stands: the epoch's random state, the batch within it, augmentation."""
        return {"epoch_start": self.epoch_start, "position": self.position,
                "augment": self.augment_rng.bit_generator.state}

    def load_state(self, state: dict) -> None:
        self.order_rng.bit_generator.state = state["epoch_start"]
        self.epoch_start = state["epoch_start"]
        self.order = self._draw_order()
        self.position = state["position"]
        self.augment_rng.bit_generator.state = state["augment"]


def validation_batches(cache: Cache, indices: np.ndarray, batch_size: int,
                       max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The validation split in a fixed order (the first `max_batches` batches of it)."""
    count = math.ceil(len(indices) / batch_size)
    if max_batches:
        count = min(count, max_batches)
    for b in range(count):
        yield gather(cache, indices[b * batch_size:(b + 1) * batch_size])


def class_balanced_weights(labels: np.ndarray) -> np.ndarray:
    """Sampling weights: each slice weighs 1/frequency of its rarest label (or of "no bleed")."""
    groups = np.concatenate([labels, (labels.sum(axis=1) == 0)[:, None]], axis=1).astype(bool)
    frequency = groups.mean(axis=0)
    inverse = np.where(frequency > 0, 1.0 / np.maximum(frequency, 1e-12), 0.0)
    weights = (groups * inverse).max(axis=1)
    return weights / weights.sum()


def random_flip_affine(images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Light augmentation: left-right flips and small rotations, scalings and shifts."""
    dtype = images.dtype
    x = images.float()
    n = x.shape[0]
    angle = torch.from_numpy(rng.uniform(-0.15, 0.15, n)).float()  # about +-9 degrees
    scale = torch.from_numpy(rng.uniform(0.9, 1.1, n)).float()
    shift = torch.from_numpy(rng.uniform(-0.05, 0.05, (n, 2))).float()
    flip = torch.from_numpy(np.where(rng.random(n) < 0.5, -1.0, 1.0)).float()
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                         torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round().clamp(0, 255).to(dtype) if dtype == torch.uint8 else out.to(dtype)
