"""The reader pool of data/folder.py: the slices one process decodes, in the same order, through
shared memory that is gone afterwards, however the reading ends."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from ich_tune.data.folder import DECODE_CHUNK, FolderImage, decode, readers
from ich_tune.data.pool import AHEAD

CHANNELS, SIZE = ["brain", "subdural", "bone"], 64
SHARED_MEMORY = Path("/dev/shm")  # where Linux keeps multiprocessing.shared_memory's blocks


def shared_blocks() -> set[str]:
    return {path.name for path in SHARED_MEMORY.glob("psm_*")}


@pytest.fixture
def slices(tmp_path) -> list[FolderImage]:
    """More images than the pool's slots hold, so that every slot is reused: two real CT slices,
    a truncated one and an MR slice, over and over."""
    ct, mr = Path(get_testdata_file("CT_small.dcm")), Path(get_testdata_file("MR_small.dcm"))
    second = Path(get_testdata_file("dicomdirtests/77654033/CT2/17106"))
    (tmp_path / "truncated.dcm").write_bytes(ct.read_bytes()[:-1000])
    for source, name in ((ct, "ct.dcm"), (second, "second.dcm"), (mr, "mr.dcm")):
        shutil.copy(source, tmp_path / name)
    names = ["ct.dcm", "truncated.dcm", "second.dcm", "mr.dcm"]
    count = 2 * AHEAD * 2 * DECODE_CHUNK + 3  # twice the slots of two workers, and a part chunk
    return [FolderImage(str(tmp_path / names[k % 4]), names[k % 4], str(k)) for k in range(count)]


@pytest.mark.skipif(not SHARED_MEMORY.is_dir(), reason="shared memory is listed in /dev/shm on Linux only")
def test_a_pool_decodes_what_one_process_decodes(slices):
    before = shared_blocks()
    with readers(1) as run:
        expected = list(decode(slices, CHANNELS, SIZE, run))
    with readers(2) as run:
        got = list(decode(slices, CHANNELS, SIZE, run))
        assert shared_blocks() == before  # released as soon as the reading ends, not with the pool

    assert [image for image, _ in got] == slices
    reasons = {image.file: result for image, result in expected if isinstance(result, str)}
    assert "truncated pixel data" in reasons["truncated.dcm"] and "MR, not CT" in reasons["mr.dcm"]
    for (image, want), (_, have) in zip(expected, got, strict=True):
        if isinstance(want, str):
            assert have == want
        else:
            assert have.shape == (3, SIZE, SIZE) and have.dtype == np.uint8
            np.testing.assert_array_equal(have, want, err_msg=image.image_id)
    first, second = (next(a for i, a in got if i.file == name) for name in ("ct.dcm", "second.dcm"))
    assert not np.array_equal(first, second)  # a slot written twice would hold the wrong slice


@pytest.mark.skipif(not SHARED_MEMORY.is_dir(), reason="shared memory is listed in /dev/shm on Linux only")
def test_reading_stopped_midway_leaves_no_shared_memory(slices):
    """As when the model fails on a batch: the decode is dropped with tasks still in flight."""
    before = shared_blocks()
    with readers(2) as run:
        stream = decode(slices, CHANNELS, SIZE, run)
        first = [next(stream) for _ in range(3)]
        assert len(shared_blocks() - before) == 1
        del stream
        assert shared_blocks() == before
    assert first[0][0] == slices[0] and first[0][1].shape == (3, SIZE, SIZE)


def test_slices_only_torch_resizes_are_decoded_by_the_parent_as_one_process_decodes_them(slices):
    """At 48 px no slice is a multiple of the size: the workers, which never import torch, leave
    every one to the parent."""
    with readers(1) as run:
        expected = list(decode(slices, CHANNELS, 48, run))
    with readers(2) as run:
        got = list(decode(slices, CHANNELS, 48, run))
    assert [image for image, _ in got] == slices
    for (image, want), (_, have) in zip(expected, got, strict=True):
        if isinstance(want, str):
            assert have == want
        else:
            assert have.shape == (3, 48, 48)
            np.testing.assert_array_equal(have, want, err_msg=image.image_id)
