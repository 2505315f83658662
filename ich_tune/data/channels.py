"""What the model sees: HU slices resized to the training size and turned into channels.

A channel is either raw HU (scaled float16) or a CT window (center, width) stored as uint8, which
keeps the preprocessed cache small; `loader.to_float` makes either a float32 model input.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ich_tune.errors import ConfigError

WINDOWS = {"brain": (40.0, 80.0), "subdural": (80.0, 200.0), "bone": (40.0, 380.0)}
HU_RANGE = (-1024.0, 3071.0)  # what a 12-bit CT can hold; "hu" channels are clipped to it
CHANNELS_KEY = "data.channels"


@dataclass(frozen=True)
class Channel:
    """One input channel: a window in HU, or raw HU when center and width are None."""

    name: str
    center: float | None
    width: float | None


def parse_channels(spec: str | list) -> tuple[Channel, ...]:
    """Channels from the config: "hu", or window names and {center, width[, name]} mappings."""
    if spec == "hu" or spec == ["hu"]:
        return (Channel("hu", None, None),)
    items = [spec] if isinstance(spec, str) else spec
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{CHANNELS_KEY}: expected \"hu\" or a non-empty list of windows "
                          f"({', '.join(WINDOWS)} or {{center: .., width: ..}}), got {spec!r}")
    channels = tuple(_window(item) for item in items)
    names = [c.name for c in channels]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"{CHANNELS_KEY}: window '{name}' appears more than once")
    return channels


def channel_dtype(channels: tuple[Channel, ...]) -> np.dtype:
    """Storage type: windows fit uint8 exactly; raw HU needs float16."""
    is_hu = any(c.center is None for c in channels)
    return np.dtype(np.float16 if is_hu else np.uint8)


def resize_area(image: np.ndarray, size: int) -> np.ndarray:
    """float32 [size, size] from any [H, W], averaging rather than sampling so thin bleeds survive.

    Integer factors take the exact mean of each block; other ratios (and upsampling) use
    antialiased bilinear interpolation, whose weights are non-negative, so values stay within
    the input range.
    """
    image = np.asarray(image, dtype=np.float32)
    height, width = image.shape
    if (height, width) == (size, size):
        return image.copy()
    if not interpolates(image.shape, size):
        # numpy, not torch: no thread pool to oversubscribe when many workers preprocess at once
        tall, wide = height // size, width // size
        rows = image.reshape(size, tall, width).sum(axis=1)
        return rows.reshape(size, size, wide).sum(axis=2) / np.float32(tall * wide)
    import torch  # only here: worker processes leave these slices to their parent (pool.py)
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(image))[None, None]
    out = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True,
                        align_corners=False)
    return out[0, 0].numpy()


def interpolates(shape: tuple[int, ...], size: int) -> bool:
    """Whether `resize_area` needs torch to bring an image of `shape` to `size`: neither the size
    itself nor an integer multiple of it."""
    height, width = shape
    return (height, width) != (size, size) and bool(height % size or width % size)


def to_channels(hu: np.ndarray, channels: tuple[Channel, ...], size: int) -> np.ndarray:
    """[C, size, size] in `channel_dtype(channels)`: resized first, then windowed."""
    resized = resize_area(hu, size)
    if channels[0].center is None:
        scaled = np.clip(resized, *HU_RANGE) / np.float32(1024.0)
        return scaled.astype(np.float16)[None]
    out = np.empty((len(channels), size, size), np.uint8)
    for index, channel in enumerate(channels):
        low = channel.center - channel.width / 2
        level = np.clip((resized - np.float32(low)) / np.float32(channel.width), 0.0, 1.0)
        out[index] = np.rint(level * np.float32(255.0))  # half to even: 127.5 -> 128
    return out


def _window(item: object) -> Channel:
    if isinstance(item, str):
        if item == "hu":
            raise ConfigError(f"{CHANNELS_KEY}: \"hu\" cannot be mixed with windows; use \"hu\" alone "
                              "or only windows")
        if item not in WINDOWS:
            close = difflib.get_close_matches(item, WINDOWS, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(WINDOWS)}"
            raise ConfigError(f"{CHANNELS_KEY}: unknown window '{item}'; {hint} "
                              "(or give {center: .., width: ..} in HU)")
        return Channel(item, *WINDOWS[item])
    if isinstance(item, Mapping):
        unknown = set(item) - {"center", "width", "name"}
        if unknown or not {"center", "width"} <= set(item):
            raise ConfigError(f"{CHANNELS_KEY}: a custom window needs keys center and width (and "
                              f"optionally name), got {dict(item)!r}")
        center, width = _number(item["center"], "center"), _number(item["width"], "width")
        if width <= 0:
            raise ConfigError(f"{CHANNELS_KEY}: window width must be > 0 HU, got {width:g}")
        name = str(item.get("name") or f"c{center:g}_w{width:g}")
        return Channel(name, center, width)
    raise ConfigError(f"{CHANNELS_KEY}: expected a window name or {{center: .., width: ..}}, "
                      f"got {item!r}")


def _number(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{CHANNELS_KEY}: window {key} must be a number in HU, got {value!r}")
    return float(value)
