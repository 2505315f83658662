"""Training and validation batches from a cache built from real DICOM files.

Every image a loader yields must be a cache row with that row's labels; an epoch must visit each
training slice once; a saved sampler state must resume the very same stream. With a context, each
channel group must be the cache row of the neighbour at its offset, found here from the index alone.
"""

from __future__ import annotations

import io
import math
from itertools import islice

import numpy as np
import pytest
import torch

from ich_tune.config.schema import DataConfig
from ich_tune.data.cache import Cache, ensure_cache, open_cache
from ich_tune.data.loader import TrainBatches, validation_batches
from ich_tune.data.neighbours import with_neighbours
from ich_tune.data.prepare import load_splits
from ich_tune.data.synthetic import generate

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # RSNA's ID_ UIDs


def build(root, cache_dir, channels) -> Cache:
    cfg = DataConfig(root=str(root), cache_dir=str(cache_dir), full_size=64, lod=1, channels=channels,
                     workers=1, max_bad_fraction=0.5)
    return open_cache(ensure_cache(cfg, root))


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, Cache]:
    root = tmp_path_factory.mktemp("rsna")
    generate(root, studies=8, slices=9, size=64, seed=0, positive_rate=0.4, quirk_rate=0.2)
    cache_dir = tmp_path_factory.mktemp("cache")
    return {"hu": build(root, cache_dir, "hu"), "windows": build(root, cache_dir, ["brain", "bone"])}


@pytest.fixture(scope="module")
def cache(caches) -> Cache:
    return caches["hu"]


@pytest.fixture(scope="module")
def splits(cache):
    return load_splits(cache.path, DataConfig())


@pytest.fixture(scope="module")
def row_of(cache) -> dict[bytes, int]:
    """Cache row of each decodable image, by its bytes: tells which slice a batch image is."""
    rows = {cache.images[i].tobytes(): int(i) for i in np.flatnonzero(cache.valid)}
    assert len(rows) == cache.valid.sum()  # every slice distinct, so the lookup is unambiguous
    return rows


def rows_in(images: torch.Tensor, row_of: dict[bytes, int]) -> list[int]:
    return [row_of[image.numpy().tobytes()] for image in images]


def same_batches(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True))


def test_batches_are_cache_rows_with_their_labels(cache, splits, row_of):
    batches = TrainBatches(cache, splits.train, batch_size=5, seed=0)
    for images, labels in islice(batches, 3 * batches.batches_per_epoch):
        assert images.shape == (5, 1, 32, 32) and images.dtype == torch.float16
        assert labels.shape == (5, 6) and labels.dtype == torch.float32
        rows = rows_in(images, row_of)
        assert set(rows) <= set(splits.train)
        np.testing.assert_array_equal(labels.numpy(), cache.labels[rows])


@pytest.mark.parametrize("remainder", [0, 3])
def test_each_epoch_visits_every_training_slice_once(cache, splits, row_of, remainder):
    size = 4
    indices = splits.train[: len(splits.train) // size * size - size + remainder]
    batches = TrainBatches(cache, indices, batch_size=size, seed=1)
    assert batches.batches_per_epoch == len(indices) // size
    stream = iter(batches)
    epochs = []
    for _ in range(3):
        batch_rows = [rows_in(images, row_of) for images, _ in islice(stream, batches.batches_per_epoch)]
        seen = [row for rows in batch_rows for row in rows]
        assert len(set(seen)) == len(seen) == len(indices) - remainder
        assert set(seen) <= set(indices)
        epochs.append(batch_rows)
    assert epochs[0] != epochs[1] != epochs[2]  # a fresh shuffle every epoch


@pytest.mark.parametrize("consumed", [0, 1, 3, 7])
def test_saved_state_resumes_the_same_stream(cache, splits, consumed):
    """Also across torch.save/torch.load(weights_only=True), as a checkpoint stores it; `consumed`
    batches before the save put it at the start, inside and at the end of an epoch."""
    kwargs = dict(indices=splits.train, batch_size=6, augment=True)
    batches = TrainBatches(cache, seed=3, **kwargs)
    assert batches.batches_per_epoch == 7  # so the cases above fall where they say
    stream = iter(batches)  # one stream, as the training loop holds it
    list(islice(stream, consumed))
    buffer = io.BytesIO()
    torch.save({"sampler": batches.state()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)["sampler"]
    expected = list(islice(stream, 10))

    resumed = TrainBatches(cache, seed=99, **kwargs)
    resumed.load_state(state)
    assert same_batches(list(islice(iter(resumed), 10)), expected)
    assert not same_batches(list(islice(TrainBatches(cache, seed=99, **kwargs), 10)), expected)


def test_balanced_sampling_raises_the_share_of_rare_classes(cache, splits):
    labels = cache.labels[splits.train]
    counts = labels.sum(axis=0)
    rare = int(np.argmin(np.where(counts > 0, counts, len(labels) + 1)))
    assert counts[rare] / len(labels) < 0.1  # the data hold a rare class to test with

    def share(balanced: bool) -> np.ndarray:
        batches = TrainBatches(cache, splits.train, batch_size=8, seed=0, balanced=balanced)
        drawn = torch.cat([y for _, y in islice(batches, 400)]).numpy()
        return drawn[:, rare].mean(), (drawn.sum(axis=1) == 0).mean()

    (plain_rare, plain_normal), (balanced_rare, balanced_normal) = share(False), share(True)
    assert plain_rare == pytest.approx(counts[rare] / len(labels), rel=0.3)
    assert balanced_rare > 2 * plain_rare
    assert balanced_normal < plain_normal


@pytest.mark.parametrize("kind", ["hu", "windows"])
def test_augment_keeps_shape_and_dtype_and_changes_pixels(caches, splits, kind):
    cache = caches[kind]
    plain = TrainBatches(cache, splits.train, batch_size=6, seed=4)
    augmented = TrainBatches(cache, splits.train, batch_size=6, seed=4, augment=True)
    for (images, labels), (moved, moved_labels) in zip(islice(plain, 5), islice(augmented, 5), strict=True):
        assert moved.shape == images.shape and moved.dtype == images.dtype
        torch.testing.assert_close(moved_labels, labels)  # the same slices, transformed
        for before, after in zip(images, moved, strict=True):
            assert not torch.equal(before, after)
            # interpolation with border padding makes no value outside the slice's own range
            assert before.min() <= after.min() and after.max() <= before.max()


def test_validation_batches_are_fixed_and_limited(cache, splits):
    val = splits.val
    assert (np.diff(val) > 0).all()
    batches = list(validation_batches(cache, val, batch_size=4))
    assert len(batches) == -(-len(val) // 4)
    assert len(batches[-1][0]) == len(val) - 4 * (len(batches) - 1)
    np.testing.assert_array_equal(torch.cat([x for x, _ in batches]).numpy(), cache.images[val])
    np.testing.assert_array_equal(torch.cat([y for _, y in batches]).numpy(), cache.labels[val])
    assert same_batches(list(validation_batches(cache, val, batch_size=4)), batches)
    assert same_batches(list(validation_batches(cache, val, batch_size=4, max_batches=2)), batches[:2])


def true_neighbours(cache: Cache, row: int, k: int) -> list[int]:
    """Rows k below to k above `row` in its series by z, ends repeated: worked out from the index."""
    z, series = cache.z[row], cache.series_uids[row]
    if not cache.valid[row] or not series or math.isnan(z):
        return [row] * (2 * k + 1)
    ordered = sorted((float(cache.z[i]), i) for i in range(len(cache.z))
                     if cache.valid[i] and cache.series_uids[i] == series and not math.isnan(cache.z[i]))
    at = [i for _, i in ordered].index(row)
    return [ordered[min(max(at + d, 0), len(ordered) - 1)][1] for d in range(-k, k + 1)]


def test_context_validation_batches_hold_each_slice_with_its_neighbours(caches, splits):
    cache = caches["windows"]  # 2 windows per slice
    assert not cache.valid.all()  # a slice that did not decode, which must be nobody's neighbour
    batches = list(validation_batches(with_neighbours(cache, 1), splits.val, batch_size=4))
    images = torch.cat([x for x, _ in batches]).numpy()
    assert images.shape == (len(splits.val), 6, 32, 32) and images.dtype == np.uint8
    np.testing.assert_array_equal(torch.cat([y for _, y in batches]).numpy(), cache.labels[splits.val])
    moved = edges = 0
    for image, row in zip(images, splits.val, strict=True):
        below, itself, above = true_neighbours(cache, row, 1)
        assert itself == row
        np.testing.assert_array_equal(image[0:2], cache.images[below])
        np.testing.assert_array_equal(image[2:4], cache.images[row])
        np.testing.assert_array_equal(image[4:6], cache.images[above])
        moved += below != row and above != row
        edges += below == row or above == row
    assert moved and edges  # both inner slices and series ends were checked


def test_context_training_batches_hold_each_slice_with_its_neighbours(caches, splits):
    cache = caches["windows"]
    row_of = {cache.images[i].tobytes(): int(i) for i in np.flatnonzero(cache.valid)}
    assert len(row_of) == cache.valid.sum()
    batches = TrainBatches(with_neighbours(cache, 2), splits.train, batch_size=5, seed=0)
    for images, labels in islice(batches, 2 * batches.batches_per_epoch):
        assert images.shape == (5, 10, 32, 32)
        rows = [row_of[image[4:6].numpy().tobytes()] for image in images]  # group 2 of 5: the slice
        np.testing.assert_array_equal(labels.numpy(), cache.labels[rows])
        for image, row in zip(images.numpy(), rows, strict=True):
            expected = cache.images[true_neighbours(cache, row, 2)]
            np.testing.assert_array_equal(image.reshape(5, 2, 32, 32), expected)


@pytest.mark.parametrize("kind", ["hu", "windows"])
def test_context_zero_gives_the_batches_of_before(caches, splits, kind):
    cache = caches[kind]
    zero = with_neighbours(cache, 0)
    for augment in (False, True):
        plain = list(islice(TrainBatches(cache, splits.train, batch_size=6, seed=5, augment=augment), 8))
        assert same_batches(list(islice(TrainBatches(zero, splits.train, batch_size=6, seed=5,
                                                     augment=augment), 8)), plain)
    assert same_batches(list(validation_batches(zero, splits.val, batch_size=4)),
                        list(validation_batches(cache, splits.val, batch_size=4)))


def test_augment_moves_the_neighbours_with_their_slice(caches, splits):
    """One transform per sample, the same for every channel group: the slice's group is exactly the
    2D augmented slice."""
    cache = caches["windows"]
    plain = TrainBatches(cache, splits.train, batch_size=6, seed=4, augment=True)
    stacked = TrainBatches(with_neighbours(cache, 1), splits.train, batch_size=6, seed=4, augment=True)
    for (images, labels), (wide, wide_labels) in zip(islice(plain, 4), islice(stacked, 4), strict=True):
        assert torch.equal(wide[:, 2:4], images) and torch.equal(wide_labels, labels)
