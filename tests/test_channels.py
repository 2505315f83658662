"""Channels: config parsing, area resizing, window values at known HU, the model's float input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ich_tune.data.channels import (
    WINDOWS,
    Channel,
    channel_dtype,
    parse_channels,
    resize_area,
    to_channels,
)
from ich_tune.data.loader import to_float
from ich_tune.errors import ConfigError

THREE = ["brain", "subdural", "bone"]


def test_parse_hu_and_named_windows():
    assert parse_channels("hu") == (Channel("hu", None, None),)
    assert parse_channels(["hu"]) == (Channel("hu", None, None),)
    assert parse_channels(THREE) == tuple(Channel(n, *WINDOWS[n]) for n in THREE)
    assert parse_channels("bone") == (Channel("bone", 40.0, 380.0),)


def test_parse_custom_windows():
    channels = parse_channels(["brain", {"center": 600, "width": 2800},
                               {"center": -600.0, "width": 1500, "name": "lung"}])
    assert channels[1:] == (Channel("c600_w2800", 600.0, 2800.0), Channel("lung", -600.0, 1500.0))


@pytest.mark.parametrize(
    ("spec", "part"),
    [
        (["brian"], "unknown window 'brian'; did you mean 'brain'?"),
        ("xyz", "unknown window 'xyz'; known: brain, subdural, bone"),
        ([], "non-empty list"),
        (["hu", "brain"], "\"hu\" cannot be mixed with windows"),
        (["brain", "hu"], "\"hu\" cannot be mixed with windows"),
        ([{"center": 40, "width": 0}], "width must be > 0 HU, got 0"),
        ([{"center": 40, "width": -80}], "width must be > 0 HU, got -80"),
        ([{"center": 40}], "needs keys center and width"),
        ([{"center": 40, "width": 80, "level": 1}], "needs keys center and width"),
        ([{"center": "high", "width": 80}], "window center must be a number in HU"),
        ([{"center": True, "width": 80}], "window center must be a number in HU"),
        (["brain", {"center": 1, "width": 2, "name": "brain"}], "'brain' appears more than once"),
        ([3], "expected a window name"),
        (7, "expected \"hu\" or a non-empty list"),
    ],
)
def test_parse_errors_name_the_key(spec, part):
    with pytest.raises(ConfigError) as caught:
        parse_channels(spec)
    assert str(caught.value).startswith("data.channels: ")
    assert part in str(caught.value)


def test_channel_dtype():
    assert channel_dtype(parse_channels(THREE)) == np.uint8
    assert channel_dtype(parse_channels("hu")) == np.float16


def test_block_mean_is_exact():
    image = np.arange(16, dtype=np.float32).reshape(4, 4)
    assert resize_area(image, 2).tolist() == [[2.5, 4.5], [10.5, 12.5]]
    rng = np.random.default_rng(0)
    big = rng.normal(0, 500, (512, 512)).astype(np.float32)
    expected = big.astype(np.float64).reshape(128, 4, 128, 4).mean(axis=(1, 3))
    np.testing.assert_allclose(resize_area(big, 128), expected, atol=1e-3)


def test_non_square_integer_factors_use_block_mean():
    image = np.arange(32, dtype=np.float32).reshape(4, 8)  # 2x4 blocks
    assert resize_area(image, 2).tolist() == [[5.5, 9.5], [21.5, 25.5]]


@pytest.mark.parametrize(("shape", "size"), [((512, 512), 200), ((666, 666), 512),
                                             ((430, 436), 128), ((3, 3), 8), ((512, 640), 512)])
def test_other_ratios_stay_in_range(shape, size):
    rng = np.random.default_rng(1)
    image = rng.uniform(-1000, 2000, shape).astype(np.float32)
    out = resize_area(image, size)
    assert out.shape == (size, size) and out.dtype == np.float32
    assert image.min() - 1e-3 <= out.min() and out.max() <= image.max() + 1e-3
    flat = resize_area(np.full(shape, 37.0, np.float32), size)
    np.testing.assert_allclose(flat, 37.0, atol=1e-4)


def test_downsampling_is_antialiased():
    # A one-pixel checkerboard: sampling would keep +-1000, averaging removes it.
    board = np.where(np.indices((512, 512)).sum(axis=0) % 2 == 0, 1000.0, -1000.0)
    assert np.abs(resize_area(board, 128)).max() == 0.0
    assert np.abs(resize_area(board, 200)).max() < 50.0


def test_same_size_returns_a_copy():
    image = np.zeros((8, 8), np.float32)
    out = resize_area(image, 8)
    out[0, 0] = 1.0
    assert image[0, 0] == 0.0


@pytest.mark.parametrize(
    ("window", "hu", "expected"),
    [
        ("brain", [-1000, 0, 20, 40, 80, 1000], [0, 0, 64, 128, 255, 255]),  # 63.75, 127.5
        ("subdural", [-20, 80, 180], [0, 128, 255]),
        ("bone", [-150, 40, 230], [0, 128, 255]),
    ],
)
def test_window_values_at_known_hu(window, hu, expected):
    image = np.array([hu], np.float32)
    image = np.repeat(image, len(hu), axis=0)  # square, so no resizing happens
    out = to_channels(image, parse_channels([window]), len(hu))
    assert out.dtype == np.uint8 and out.shape == (1, len(hu), len(hu))
    assert out[0, 0].tolist() == expected


def test_resize_happens_before_windowing():
    block = np.array([[-1000.0, 1160.0], [0.0, 0.0]], np.float32)  # mean 40 HU
    out = to_channels(block, parse_channels(["brain"]), 1)
    assert out.tolist() == [[[128]]]  # windowing first would give round(255 / 4) = 64


def test_three_windows_stack_in_order():
    image = np.full((4, 4), 80.0, np.float32)
    out = to_channels(image, parse_channels(THREE), 2)
    assert out.shape == (3, 2, 2)
    assert out[:, 0, 0].tolist() == [255, 128, 154]  # bone: (80 + 150) / 380 * 255 = 154.3


def test_hu_channel_is_scaled_float16():
    image = np.array([[-2000.0, -1024.0], [1024.0, 5000.0]], np.float32)
    out = to_channels(image, parse_channels("hu"), 2)
    assert out.dtype == np.float16 and out.shape == (1, 2, 2)
    assert out[0].tolist() == [[-1.0, -1.0], [1.0, np.float16(3071 / 1024)]]


def test_to_float():
    windows = torch.tensor([[0, 128, 255]], dtype=torch.uint8)
    out = to_float(windows)
    assert out.dtype == torch.float32
    assert out[0].tolist() == pytest.approx([0.0, 128 / 255, 1.0])
    hu = torch.tensor([-1.0, 0.5, 2.9990234375], dtype=torch.float16)
    assert to_float(hu).dtype == torch.float32 and to_float(hu).tolist() == hu.tolist()
    with pytest.raises(TypeError, match="int64"):
        to_float(torch.zeros(2, dtype=torch.int64))
