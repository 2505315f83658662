"""Training and validation batches from a cache built from real DICOM files.

Every image a loader yields must be a cache row with that row's labels; an epoch must visit each
training slice once; a saved sampler state must resume the very same stream.
"""

from __future__ import annotations

import io
from itertools import islice

import numpy as np
import pytest
import torch

from ich_tune.config.schema import DataConfig
from ich_tune.data.cache import Cache, ensure_cache, open_cache
from ich_tune.data.loader import TrainBatches, validation_batches
from ich_tune.data.prepare import load_splits
from ich_tune.data.synthetic import generate

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # RSNA's ID_ UIDs


def build(root, cache_dir, channels) -> Cache:
    cfg = DataConfig(root=str(root), cache_dir=str(cache_dir), full_size=64, lod=1, channels=channels,
                     workers=1, max_bad_fraction=0.5)
    return open_cache(ensure_cache(cfg, root, lambda *_: None))


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
    return load_splits(cache.path, DataConfig(), lambda *_: None)


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
