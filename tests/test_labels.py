"""The Kaggle labels CSV: round trips, any row order, duplicates, and every kind of bad line."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from ich_tune.data.labels import CLASSES, read_labels, write_labels
from ich_tune.errors import DataError


def random_labels(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    values = rng.choice(16**9, size=n, replace=False)
    ids = np.array([f"ID_{v:09x}" for v in values.tolist()])
    y = (rng.random((n, len(CLASSES))) < 0.1).astype(np.uint8)
    return ids, y


def write_rows(path, rows: list[str], header: str = "ID,Label", end: str = "\n"):
    path.write_text(end.join([header, *rows]) + end, newline="")
    return path


def expect_error(path, *parts: str) -> str:
    with pytest.raises(DataError) as caught:
        read_labels(path)
    message = str(caught.value)
    for part in parts:
        assert part in message, message
    return message


def image_rows(image: str, labels=(0, 0, 0, 0, 0, 0)) -> list[str]:
    return [f"{image}_{name},{value}" for name, value in zip(CLASSES, labels, strict=True)]


def test_round_trip_shuffled_60k_rows(tmp_path):
    ids, y = random_labels(10_000)
    path = tmp_path / "stage_2_train.csv"
    write_labels(path, ids, y)
    lines = path.read_text().splitlines()
    assert lines[0] == "ID,Label" and len(lines) == 60_001
    body = lines[1:]
    np.random.default_rng(1).shuffle(body)
    write_rows(path, body)

    labels = read_labels(path)
    order = np.argsort(ids)
    assert labels.ids.tolist() == ids[order].tolist()
    np.testing.assert_array_equal(labels.y, y[order])
    assert labels.y.dtype == np.uint8 and labels.duplicate_rows == 0


def test_kaggle_layout_and_gzip(tmp_path):
    ids, y = random_labels(50, seed=3)
    plain, packed = tmp_path / "labels.csv", tmp_path / "labels.csv.gz"
    write_labels(plain, ids, y)
    write_labels(packed, ids, y)
    assert gzip.decompress(packed.read_bytes()) == plain.read_bytes()
    first = plain.read_text().splitlines()[1:7]
    assert first == [f"{ids[0]}_{name},{y[0, k]}" for k, name in enumerate(CLASSES)]
    a, b = read_labels(plain), read_labels(packed)
    assert a.ids.tolist() == b.ids.tolist() == sorted(ids.tolist())
    np.testing.assert_array_equal(a.y, b.y)


def test_columns_follow_classes_order(tmp_path):
    rows = image_rows("ID_12", (1, 0, 0, 0, 1, 1)) + image_rows("ID_0a")
    labels = read_labels(write_rows(tmp_path / "l.csv", rows[::-1]))
    assert labels.ids.tolist() == ["ID_0a", "ID_12"]
    assert labels.y.tolist() == [[0] * 6, [1, 0, 0, 0, 1, 1]]


def test_ids_keep_leading_zeros_and_sort_as_text(tmp_path):
    rows = image_rows("ID_a") + image_rows("ID_0b") + image_rows("ID_00b", (1,) * 6)
    labels = read_labels(write_rows(tmp_path / "l.csv", rows))
    assert labels.ids.tolist() == ["ID_00b", "ID_0b", "ID_a"]
    assert labels.y[:, 0].tolist() == [1, 0, 0]


def test_crlf_bom_blank_lines_and_no_final_newline(tmp_path):
    rows = image_rows("ID_1", (0, 1, 0, 0, 0, 1))
    text = "\ufeffID,Label\r\n" + "\r\n".join(rows[:3]) + "\r\n\r\n" + "\r\n".join(rows[3:])
    path = tmp_path / "l.csv"
    path.write_bytes(text.encode("utf-8"))
    labels = read_labels(path)
    assert labels.ids.tolist() == ["ID_1"] and labels.y.tolist() == [[0, 1, 0, 0, 0, 1]]


def test_consistent_duplicates_collapse(tmp_path):
    rows = image_rows("ID_aa", (1, 0, 0, 0, 0, 1)) + image_rows("ID_bb")
    rows += rows[:6] + ["ID_bb_any,0"]  # 7 repeated rows
    labels = read_labels(write_rows(tmp_path / "l.csv", rows))
    assert labels.duplicate_rows == 7
    assert labels.y.tolist() == [[1, 0, 0, 0, 0, 1], [0] * 6]


def test_conflicting_duplicates(tmp_path):
    rows = image_rows("ID_aa") + image_rows("ID_bb") + ["ID_bb_subdural,1"]
    path = write_rows(tmp_path / "l.csv", rows)
    expect_error(path, f"{path}:12 and line 14:", "image ID_bb", "'subdural' labels 0 and 1")


def test_missing_subtype(tmp_path):
    rows = image_rows("ID_aa") + image_rows("ID_bb")
    del rows[9]  # ID_bb's subarachnoid row
    path = write_rows(tmp_path / "l.csv", rows)
    expect_error(path, f"{path}:8:", "image ID_bb has no 'subarachnoid' row")


@pytest.mark.parametrize(
    ("row", "parts"),
    [
        ("ID_ab_any,2", ["label '2' is not 0 or 1"]),
        ("ID_ab_any,0.5", ["label '0.5' is not 0 or 1"]),
        ("ID_ab_any,", ["label '' is not 0 or 1"]),
        ("ID_ab_any, 1", ["label ' 1' is not 0 or 1"]),
        ("ID_ab_any,1,0", ["expected 2 columns (ID,Label), found 3"]),
        ("ID_ab_any", ["expected 2 columns (ID,Label), found 1"]),
        ("ID_AB_any,1", ["malformed ID 'ID_AB_any'"]),
        ("ID_xyz_any,1", ["malformed ID 'ID_xyz_any'"]),
        ("IX_ab_any,1", ["malformed ID 'IX_ab_any'"]),
        ("ID__any,1", ["malformed ID 'ID__any'"]),
        ("ID_abany,1", ["malformed ID 'ID_abany'"]),
        ("ID_a_b_any,1", ["malformed ID 'ID_a_b_any'"]),
        (f"ID_{'a' * 16}_any,1", ["malformed ID", "1 to 15 lowercase hex digits"]),
        ("ID_ab_epidurall,1", ["unknown subtype 'epidurall'", "did you mean 'epidural'?"]),
        ("ID_ab_Any,1", ["unknown subtype 'Any'"]),
        ("ID_ab_hemorrhage,1", ["unknown subtype 'hemorrhage'"]),
        ("ID_\u00e9b_any,1", ["malformed ID"]),
    ],
)
def test_bad_row_names_file_line_and_fix(tmp_path, row, parts):
    rows = image_rows("ID_ab")
    rows[3] = row
    path = write_rows(tmp_path / "l.csv", rows)
    message = expect_error(path, f"{path}:5: ", *parts)
    assert message.endswith("each row must read ID_<hex>_<subtype>,<0|1> with subtype one of "
                            + ", ".join(CLASSES))


def test_first_bad_line_in_file_order_is_reported(tmp_path):
    rows = image_rows("ID_ab")
    rows[4], rows[1] = "ID_ab_any,7", "ID_ab_nope,1"
    path = write_rows(tmp_path / "l.csv", rows)
    expect_error(path, f"{path}:3: unknown subtype 'nope'")


def test_line_numbers_count_blank_lines(tmp_path):
    rows = image_rows("ID_ab")
    rows[2] = "ID_ab_x,1"
    path = write_rows(tmp_path / "l.csv", ["", "", *rows])
    expect_error(path, f"{path}:6: unknown subtype 'x'")


@pytest.mark.parametrize("header", ["id,label", "ID,Label,Extra", "ID_ab_any,0"])
def test_bad_header(tmp_path, header):
    path = write_rows(tmp_path / "l.csv", image_rows("ID_ab"), header=header)
    expect_error(path, f"{path}:1: header is {header!r}, expected 'ID,Label'")


def test_no_rows_or_empty_file(tmp_path):
    path = tmp_path / "l.csv"
    path.write_text("ID,Label\n")
    expect_error(path, "no label rows after the header")
    path.write_text("")
    expect_error(path, f"{path}:1: header is ''")


def test_missing_and_damaged_files(tmp_path):
    expect_error(tmp_path / "nope.csv", "labels file not found")
    path = tmp_path / "l.csv.gz"
    write_labels(path, *random_labels(20))
    path.write_bytes(path.read_bytes()[:-30])
    expect_error(path, "damaged gzip file")


def test_write_labels_refuses_bad_arrays(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        write_labels(tmp_path / "l.csv", ["ID_1"], np.zeros((1, 5)))
    with pytest.raises(ValueError, match="0 or 1"):
        write_labels(tmp_path / "l.csv", ["ID_1"], np.full((1, 6), 2))
