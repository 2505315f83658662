"""2.5D input: each slice stacked with its neighbours in the same series (`data.context`).

A bleed is a 3D object: a thin subdural crescent or a small focus is easier to tell from noise when
the slices above and below show it too. The cache keeps one array per slice, so every context
shares it; the neighbours are gathered when a batch is assembled.

Channel order, for C windows and context k: 2k+1 groups of C channels, one group per neighbour
offset from -k (k slices below, lower ImagePositionPatient z) to +k (above), each group holding the
C windows in `data.channels` order; the slice itself is group k. Channel `g * C + c` is window `c`
of the slice at offset `g - k`. With k = 0 the input is the slice alone, as in 2D.

Neighbour rules: slices of one series ordered by z (ties by cache row); past either end of the
series the end slice repeats. Only slices that decoded and have a series UID and a z count as
neighbours; a slice without a series UID or z, or one that did not decode, has only itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ich_tune.config.schema import DataConfig
from ich_tune.data.cache import Cache
from ich_tune.data.channels import parse_channels


def input_channels(cfg: DataConfig) -> int:
    """The number of channels a model of this data config takes."""
    return len(parse_channels(cfg.channels)) * (2 * cfg.context + 1)


def neighbour_table(series_uids: np.ndarray, z: np.ndarray, valid: np.ndarray, k: int) -> np.ndarray:
    """[N, 2k+1] row indices: for every slice, the slices at offsets -k..+k in its series by z."""
    n = len(z)
    table = np.repeat(np.arange(n)[:, None], 2 * k + 1, axis=1)
    z = np.asarray(z, dtype=np.float64)
    usable = np.flatnonzero(np.asarray(valid, bool) & (np.asarray(series_uids) != "") & np.isfinite(z))
    if k == 0 or len(usable) == 0:
        return table
    _, series = np.unique(np.asarray(series_uids)[usable], return_inverse=True)
    sort = np.lexsort((usable, z[usable], series))  # series, then z, then row
    order, series = usable[sort], series[sort]
    position = np.arange(len(order))
    first = np.r_[True, series[1:] != series[:-1]]
    last = np.r_[series[1:] != series[:-1], True]
    start = np.maximum.accumulate(np.where(first, position, 0))
    end = np.minimum.accumulate(np.where(last, position, len(order))[::-1])[::-1]
    for column, offset in enumerate(range(-k, k + 1)):
        table[order, column] = order[np.clip(position + offset, start, end)]
    return table


def stack_neighbours(images: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """[B, (2k+1) * C, S, S] from slices [N, C, S, S] and neighbour rows [B, 2k+1] into them."""
    picked = images[rows.ravel()]
    return picked.reshape(len(rows), -1, *picked.shape[2:])


@dataclass
class NeighbourCache(Cache):
    """An opened cache that knows each slice's neighbours; the loader stacks them as channels."""

    neighbours: np.ndarray  # [N, 2k+1], from neighbour_table


def with_neighbours(cache: Cache, k: int) -> NeighbourCache:
    """The cache with its neighbour table for context k, built once here."""
    table = neighbour_table(cache.series_uids, cache.z, cache.valid, k)
    return NeighbourCache(**vars(cache), neighbours=table)
