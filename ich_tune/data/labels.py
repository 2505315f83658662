"""The Kaggle labels CSV (`stage_2_train.csv`): six `ID_<hex>_<subtype>,<0|1>` rows per image.

The real file has 4.5 million rows, so parsing is vectorised with numpy over the raw bytes; only
the first bad line is decoded in Python, to say exactly what is wrong with it.
"""

from __future__ import annotations

import difflib
import gzip
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ich_tune.errors import DataError

CLASSES = (
    "epidural",
    "intraparenchymal",
    "intraventricular",
    "subarachnoid",
    "subdural",
    "any",
)
SHORT_NAMES = ("EDH", "IPH", "IVH", "SAH", "SDH", "any")  # radiology shorthand, for tables and plots
HEADER = "ID,Label"
_MAX_HEX = 15  # hex digits that fit beside a 4-bit length in one uint64 key
_ID = re.compile(rf"ID_[0-9a-f]{{1,{_MAX_HEX}}}")
_PAD = 16  # zero bytes around the file so that 16-byte reads near its ends stay in bounds
_NIBBLE = np.full(256, 255, np.uint8)  # hex digit value of an ASCII byte, 255 if none
_NIBBLE[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16)
_ROW_FORMAT = f"each row must read ID_<hex>_<subtype>,<0|1> with subtype one of {', '.join(CLASSES)}"


@dataclass
class Labels:
    """One row per image: `y[i]` holds the six 0/1 labels of `ids[i]`, columns in CLASSES order."""

    ids: np.ndarray  # str "ID_<hex>", sorted
    y: np.ndarray  # uint8 [N, 6]
    duplicate_rows: int  # rows that repeated an earlier (image, subtype) with the same label


@dataclass
class _Rows:
    key: np.ndarray  # uint64 image key: hex length << 60 | hex value
    sub: np.ndarray  # int64 index into CLASSES
    label: np.ndarray  # uint8
    line: np.ndarray  # 1-based line number in the file


def read_labels(path: Path) -> Labels:
    """Read `stage_2_train.csv` (or `.csv.gz`); DataError names the file and line of a problem."""
    path = Path(path)
    data = _read_bytes(path)
    return _collect(path, _scan(path, data, _body_start(path, data)))


def write_labels(path: Path, ids, y) -> None:
    """Write labels in the Kaggle format (gzip when `path` ends in .gz) for synthetic data."""
    y = np.asarray(y)
    if y.ndim != 2 or y.shape[1] != len(CLASSES) or len(ids) != len(y):
        raise ValueError(f"need y of shape [{len(ids)}, {len(CLASSES)}], got {y.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    rows = [
        f"{image}_{name},{value}"
        for image, values in zip(ids, y.tolist(), strict=True)
        for name, value in zip(CLASSES, values, strict=True)
    ]
    data = "\n".join([HEADER, *rows, ""]).encode()
    path = Path(path)
    if path.suffix == ".gz":
        data = gzip.compress(data, compresslevel=6)
    path.write_bytes(data)


def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: labels file not found; point the data root at the folder "
                        "that holds Kaggle's stage_2_train.csv") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read the labels file: {err.strerror}") from None
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        return gzip.decompress(data)
    except (EOFError, OSError, zlib.error) as err:
        raise DataError(f"{path}: damaged gzip file ({err}); download or unpack it again") from None


def _body_start(path: Path, data: bytes) -> int:
    """Offset of the first row after the `ID,Label` header (a UTF-8 BOM is allowed)."""
    start = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    end = data.find(b"\n", start)
    end = len(data) if end < 0 else end
    header = data[start:end].rstrip(b"\r")
    if header != HEADER.encode():
        raise DataError(f"{path}:1: header is {_clip(header)!r}, expected {HEADER!r}; "
                        "is this Kaggle's stage_2_train.csv?")
    return end + 1


def _scan(path: Path, data: bytes, start: int) -> _Rows:
    """Split and check every row at once; raise on the first bad line in file order."""
    buf = np.frombuffer(data, np.uint8)
    n = len(buf)
    ends = np.flatnonzero(buf[start:] == ord("\n")) + start
    if start < n and buf[-1] != ord("\n"):
        ends = np.append(ends, n)
    starts = np.concatenate(([start], ends[:-1] + 1)).astype(np.int64)[: len(ends)]
    line = np.arange(2, len(ends) + 2)
    ends = ends - ((ends > starts) & (buf[np.maximum(ends - 1, 0)] == ord("\r")))
    filled = ends > starts  # blank lines (a trailing one is common) are skipped
    starts, ends, line = starts[filled], ends[filled], line[filled]
    if len(starts) == 0:
        raise DataError(f"{path}: no label rows after the header; {_ROW_FORMAT}")

    def at(index: np.ndarray) -> np.ndarray:
        return buf[np.clip(index, 0, n - 1)]

    # Sentinels: a comma past the end and an underscore before the start keep every lookup
    # in bounds; rows that only find a sentinel fail the checks below.
    commas = np.append(np.flatnonzero(buf == ord(",")), n)
    first = np.searchsorted(commas, starts)
    ok = np.searchsorted(commas, ends) - first == 1
    comma = commas[first]
    ok &= (ends - comma == 2) & ((at(comma + 1) == ord("0")) | (at(comma + 1) == ord("1")))
    label = (at(comma + 1) - ord("0")).astype(np.uint8)

    unders = np.concatenate(([-1], np.flatnonzero(buf == ord("_"))))
    under = unders[np.searchsorted(unders, comma) - 1]
    ok &= under >= starts + 4
    ok &= (at(starts) == ord("I")) & (at(starts + 1) == ord("D")) & (at(starts + 2) == ord("_"))

    words = _byte_words(data)
    key, hex_ok = _hex_keys(words, under, under - starts - 3)
    ok &= hex_ok
    sub = _subtypes(words, under + 1, comma - under - 1)
    ok &= sub >= 0

    if not ok.all():
        bad = int(np.argmin(ok))
        raise DataError(f"{path}:{line[bad]}: {_problem(data[starts[bad]:ends[bad]])}; {_ROW_FORMAT}")
    return _Rows(key=key, sub=sub, label=label, line=line)


def _byte_words(data: bytes) -> np.ndarray:
    """`words[i + _PAD]` is a uint64 holding the 8 bytes at offset i (zero past either end).

    Reading 8 or 16 bytes per row in one gather is much faster than one gather per byte.
    """
    padded = bytes(_PAD) + data + bytes(_PAD)
    return np.ndarray((len(padded) - 7,), np.uint64, padded, strides=(1,))


def _bytes_at(words: np.ndarray, begin: np.ndarray, count: int) -> np.ndarray:
    """[rows, count] bytes from each offset in `begin` (count a multiple of 8)."""
    out = np.stack([words[begin + _PAD + 8 * k] for k in range(count // 8)], axis=1)
    return out.view(np.uint8).reshape(len(begin), count)


def _hex_keys(
    words: np.ndarray, end: np.ndarray, length: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A uint64 key per row (hex length << 60 | hex value) and whether the hex id was valid."""
    ok = (length >= 1) & (length <= _MAX_HEX)
    chars = _bytes_at(words, end - 16, 16)  # right-aligned: the last digit lands in column 15
    digits = _NIBBLE[chars]
    inside = np.arange(16) >= 16 - length[:, None]
    ok &= ((digits < 16) | ~inside).all(axis=1)
    digits = np.where(inside, digits, 0)
    value = ((digits[:, 0::2] << 4) | digits[:, 1::2]).view(">u8").ravel().astype(np.uint64)
    return value | (np.clip(length, 0, _MAX_HEX).astype(np.uint64) << np.uint64(60)), ok


def _subtypes(words: np.ndarray, begin: np.ndarray, length: np.ndarray) -> np.ndarray:
    """Index into CLASSES of each row's subtype text, -1 where it is none of them.

    A subtype of up to 16 characters is fully covered by its first and its last 8 bytes.
    """
    first = words[begin + _PAD]
    last = words[np.maximum(begin + length - 8, begin) + _PAD]
    sub = np.full(len(begin), -1, np.int64)
    for index, name in enumerate(CLASSES):
        text = name.encode()
        size = len(text)
        if size >= 8:
            match = (first == _word(text[:8])) & (last == _word(text[-8:]))
        else:
            match = (first & _word(b"\xff" * size)) == _word(text)
        sub[(length == size) & match] = index
    return sub


def _word(text: bytes) -> np.uint64:
    return np.frombuffer(text.ljust(8, b"\0"), np.uint64)[0]


def _problem(row: bytes) -> str:
    """What is wrong with one row, in words (the slow check, run on the first bad line only)."""
    fields = row.split(b",")
    if len(fields) != 2:
        return f"expected 2 columns (ID,Label), found {len(fields)} in {_clip(row)!r}"
    row_id, label = (_clip(field) for field in fields)
    if label not in ("0", "1"):
        return f"label {label!r} is not 0 or 1"
    image, _, subtype = row_id.rpartition("_")
    if not _ID.fullmatch(image):
        return (f"malformed ID {row_id!r}: expected ID_ followed by 1 to {_MAX_HEX} "
                "lowercase hex digits, an underscore and the subtype")
    close = difflib.get_close_matches(subtype, CLASSES, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown subtype {subtype!r} in {row_id!r}{hint}"


def _clip(text: bytes, limit: int = 80) -> str:
    """Bytes from the file, decoded for a message and cut short (a binary file has no line ends)."""
    shown = text[:limit].decode("utf-8", "replace")
    return shown + "..." if len(text) > limit else shown


def _collect(path: Path, rows: _Rows) -> Labels:
    """Group rows by image: collapse consistent duplicates, refuse conflicts and gaps."""
    order = np.argsort(rows.key)
    ordered = rows.key[order]
    new = np.concatenate(([True], ordered[1:] != ordered[:-1]))
    keys = ordered[new]
    image = np.empty(len(order), np.int64)
    image[order] = np.cumsum(new) - 1
    slot = image * len(CLASSES) + rows.sub
    count = np.bincount(slot, minlength=len(keys) * len(CLASSES))
    ones = np.bincount(slot, weights=rows.label, minlength=len(count))
    clash = np.flatnonzero((ones > 0) & (ones < count))
    if len(clash):
        pair = np.flatnonzero(slot == clash[0])
        a = pair[0]
        b = pair[np.argmax(rows.label[pair] != rows.label[a])]
        raise DataError(
            f"{path}:{rows.line[a]} and line {rows.line[b]}: image {_image_ids(keys[image[[a]]])[0]}"
            f" has conflicting '{CLASSES[rows.sub[a]]}' labels {rows.label[a]} and "
            f"{rows.label[b]}; keep only the right row")
    gaps = np.flatnonzero(count == 0)
    if len(gaps):
        owner = gaps[0] // len(CLASSES)
        row = int(np.argmax(image == owner))
        raise DataError(
            f"{path}:{rows.line[row]}: image {_image_ids(keys[[owner]])[0]} has no "
            f"'{CLASSES[gaps[0] % len(CLASSES)]}' row; every image needs one row per subtype "
            f"({', '.join(CLASSES)})")
    y = (ones > 0).astype(np.uint8).reshape(-1, len(CLASSES))
    ids = _image_ids(keys)
    if len(np.unique(keys >> np.uint64(60))) > 1:  # key order puts shorter ids first
        order = np.argsort(ids, kind="stable")
        ids, y = ids[order], y[order]
    return Labels(ids=ids, y=y, duplicate_rows=int((count - 1).sum()))


def _image_ids(keys: np.ndarray) -> np.ndarray:
    """The "ID_<hex>" strings of image keys, as a numpy str array."""
    length = (keys >> np.uint64(60)).astype(np.int64)
    width = int(length.max())
    shift = 4 * (length[:, None] - 1 - np.arange(width))
    digits = (keys[:, None] >> np.maximum(shift, 0).astype(np.uint64)) & np.uint64(15)
    chars = np.where(shift >= 0, np.frombuffer(b"0123456789abcdef", np.uint8)[digits], 0)
    prefix = np.broadcast_to(np.frombuffer(b"ID_", np.uint8), (len(keys), 3))
    text = np.ascontiguousarray(np.concatenate([prefix, chars.astype(np.uint8)], axis=1))
    return text.view(f"S{width + 3}").ravel().astype(str)
