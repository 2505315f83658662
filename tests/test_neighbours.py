"""2.5D input: the neighbour table worked by hand, the channel layout, and the config key.

The index below is the kind a cache holds: rows in file order (not grouped by series), a slice that
did not decode, one without a position, one without a series.
"""

import numpy as np
import pytest

from ich_tune.config.schema import DataConfig
from ich_tune.data.cache import ensure_cache
from ich_tune.data.neighbours import input_channels, neighbour_table, stack_neighbours
from ich_tune.errors import ConfigError
from ich_tune.experiment import load_search
from tests.conftest import ROOT

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # RSNA's ID_ UIDs

#                  0    1    2    3    4    5       6    7    8    9
SERIES = np.array(["A", "B", "A", "A", "", "A", "B", "A", "A", "B"])
Z = np.array([2.0, 20.0, 0.0, 3.0, 1.0, np.nan, 10.0, 1.0, 1.5, 10.0])
VALID = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 1], bool)
# By z: A is rows 2 (z 0), 7 (z 1), 0 (z 2), 3 (z 3); row 8 (z 1.5) did not decode, row 5 has no z.
# B is rows 6 and 9 (both z 10: row order breaks the tie), then 1 (z 20). Row 4 has no series.


def test_context_one_by_hand():
    expected = [
        [7, 0, 3],  # A, z 2
        [9, 1, 1],  # B's top slice: the end repeats above it
        [2, 2, 7],  # A's bottom slice: the end repeats below it
        [0, 3, 3],
        [4, 4, 4],  # no series: alone
        [5, 5, 5],  # no z: alone
        [6, 6, 9],
        [2, 7, 0],  # the undecodable row 8 (z 1.5) is no neighbour
        [8, 8, 8],  # undecodable: alone
        [6, 9, 1],
    ]
    np.testing.assert_array_equal(neighbour_table(SERIES, Z, VALID, 1), expected)


def test_context_two_repeats_the_end_slice_as_far_as_it_reaches():
    table = neighbour_table(SERIES, Z, VALID, 2)
    assert table.shape == (10, 5)
    np.testing.assert_array_equal(table[2], [2, 2, 2, 7, 0])
    np.testing.assert_array_equal(table[3], [7, 0, 3, 3, 3])
    np.testing.assert_array_equal(table[1], [6, 9, 1, 1, 1])
    np.testing.assert_array_equal(table[8], [8] * 5)


def test_context_zero_is_each_slice_alone():
    np.testing.assert_array_equal(neighbour_table(SERIES, Z, VALID, 0), np.arange(10)[:, None])


def test_nothing_usable_leaves_every_slice_alone():
    table = neighbour_table(np.array(["", ""]), np.array([1.0, 2.0]), np.array([True, True]), 3)
    np.testing.assert_array_equal(table, [[0] * 7, [1] * 7])


def test_stack_groups_channels_by_offset_each_holding_every_window():
    images = np.arange(4 * 3 * 2 * 2, dtype=np.uint8).reshape(4, 3, 2, 2)  # 4 slices, 3 windows
    rows = np.array([[1, 2, 3], [0, 0, 1]])
    out = stack_neighbours(images, rows)
    assert out.shape == (2, 9, 2, 2) and out.dtype == np.uint8
    for b in range(2):
        for group in range(3):
            for window in range(3):
                np.testing.assert_array_equal(out[b, group * 3 + window], images[rows[b, group], window])


@pytest.mark.parametrize("channels, context, expected", [
    ("hu", 0, 1), ("hu", 2, 5), (["brain", "subdural", "bone"], 0, 3), (["brain", "subdural", "bone"], 1, 9)])
def test_input_channels(channels, context, expected):
    assert input_channels(DataConfig(channels=channels, context=context)) == expected


def test_context_is_searchable_and_bounded(tmp_path):
    search = load_search(ROOT / "search_spaces/demo.yaml", ["data.context={grid_search: [0, 1, 2]}"])
    assert "data.context" in [d.path for d in search.dimensions]
    assert search.grid_points == 9 * 3
    with pytest.raises(ConfigError, match=r"data.context.*outside \[0, 8\]"):
        load_search(ROOT / "search_spaces/demo.yaml", ["data.context=9"])


def test_every_context_shares_one_cache(tiny_rsna, tmp_path):
    paths = {ensure_cache(DataConfig(root=str(tiny_rsna), cache_dir=str(tmp_path), full_size=64, lod=1,
                                     context=k, max_bad_fraction=0.2, workers=1), tiny_rsna)
             for k in (0, 2)}
    assert len(paths) == 1
