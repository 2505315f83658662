"""Bad bytes in every file the tool reads: each case loads, or fails with one UserError naming the file.

Seeded mutations of the shipped YAML files, of a labels CSV, of DICOM slices and of a weights file
(flipped, inserted and deleted bytes, truncations, shuffled and repeated lines), random bytes, and
hand-picked shapes (empty, binary, non-UTF-8, a folder, deep nesting, huge numbers, .inf/.nan), all
in-process; then a few runs of the CLI on bad files, which must exit 0 or 2 without a traceback.
A failing case names its seed and index, so it can be replayed alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io
import random
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ich_tune.config.loader import load_tree
from ich_tune.data.channels import parse_channels
from ich_tune.data.dicom import DicomError, read_header, read_slice
from ich_tune.data.labels import CLASSES, read_labels, write_labels
from ich_tune.errors import ConfigError, DataError, UserError
from ich_tune.experiment import build_experiment, load_experiment, load_search
from ich_tune.models import build_model
from ich_tune.models.resnet import ResNetConfig
from ich_tune.tracking.references import load_trained
from ich_tune.training.checkpoint import load_weights
from tests.conftest import ROOT, Cli, tiny_tree

SEED = 20240917
SHIPPED = sorted(str(p.relative_to(ROOT)) for folder in ("experiments", "search_spaces")
                 for p in (ROOT / folder).rglob("*.yaml"))
RUNNABLE = [name for name in SHIPPED if "/include/" not in name]  # include/ holds fragments
YAML_TOKENS = [b": ", b"- ", b"{", b"}", b"[", b"]", b"&a ", b"*a", b"<<: *a", b"? ", b"!!binary ",
               b"!!python/object:os.system ", b"!!int ", b"!!map ", b".inf", b"-.inf", b".nan", b"1e999",
               b"9" * 30, b"0x" + b"f" * 40, b"2001-13-45", b"include: ", b"include: [.]",
               b"grid_search: ", b"uniform: {lower: 1, upper: 0}", b"~", b"---\n", b"%YAML 1.1\n",
               b"\t", b"\x00", b"\x07", b"\xff", b"\xef\xbb\xbf", b"'", b'"', b"#", b"|", b"\r", b"\n  "]
CSV_TOKENS = [b",", b"_", b"\n", b"\r\n", b"\r", b"ID_", b"any", b"0", b"1", b"2", b" ", b"\x00", b"\xff",
              b"ID,Label\n", b"\xef\xbb\xbf", b"f" * 20, b"_subdural"]


def mutate(rng: random.Random, data: bytes, tokens: Sequence[bytes] = ()) -> bytes:
    """One random edit of the kind a damaged, cut-off or carelessly edited file shows."""
    out = bytearray(data)
    kind = rng.randrange(6)
    if kind == 0 and out:  # flipped bytes
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] = rng.randrange(256)
    elif kind == 1:  # inserted tokens or random bytes
        for _ in range(rng.randint(1, 6)):
            piece = rng.choice(tokens) if tokens and rng.random() < 0.7 else rng.randbytes(rng.randint(1, 4))
            at = rng.randrange(len(out) + 1)
            out[at:at] = piece
    elif kind == 2:  # deleted spans
        for _ in range(rng.randint(1, 6)):
            at = rng.randrange(len(out) + 1)
            del out[at:at + rng.randint(1, 8)]
    elif kind == 3:  # cut off
        del out[rng.randrange(len(out) + 1):]
    else:  # lines shuffled (the first kept in place half the time), or one repeated elsewhere
        lines = bytes(out).split(b"\n")
        keep = lines[:1] if rng.random() < 0.5 else []
        rest = lines[len(keep):]
        if kind == 4:
            rng.shuffle(rest)
        elif rest:
            rest.insert(rng.randrange(len(rest) + 1), rng.choice(rest))
        out = bytearray(b"\n".join(keep + rest))
    return bytes(out)


def names_a_file(message: str) -> bool:
    """A UserError message starts with the file it is about: 'path: ...' or 'path:line: ...'."""
    first = message.split(":", 1)[0]
    return bool(first) and Path(first).exists()


def check(case: str, load: Callable[..., object], *args: object) -> None:
    """`load(*args)` succeeds, or raises a UserError whose message names the file; anything else fails."""
    try:
        load(*args)
    except UserError as err:
        assert names_a_file(str(err)), f"{case}: the message names no file: {err}"
    except Exception as err:  # the point of the test: name the case that crashed
        raise AssertionError(f"{case}: {type(err).__name__}: {err}") from err


def load_any(path: Path) -> object:
    """What `show-config` does: a search if the file has an `experiment` key, else an experiment."""
    tree, _ = load_tree(path)
    return load_search(path) if "experiment" in tree else load_experiment(path)


@pytest.fixture
def shipped(tmp_path, monkeypatch) -> Path:
    """A copy of the shipped experiment and search files, also the working directory (for includes)."""
    for folder in ("experiments", "search_spaces"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --- experiment and search YAML ---------------------------------------------------------------

def test_shipped_files_load(shipped):
    for name in RUNNABLE:
        load_any(shipped / name)


def test_mutated_shipped_yaml(shipped):
    rng = random.Random(SEED)
    originals = {name: (shipped / name).read_bytes() for name in SHIPPED}
    for index in range(120):
        name, target = rng.choice(SHIPPED), rng.choice(RUNNABLE)
        (shipped / name).write_bytes(mutate(rng, originals[name], YAML_TOKENS))
        check(f"seed {SEED} case {index}: {name} mutated, {target} loaded", load_any, shipped / target)
        (shipped / name).write_bytes(originals[name])


def test_random_bytes_as_yaml(shipped):
    rng = random.Random(SEED + 1)
    path = shipped / "random.yaml"
    for index in range(30):
        data = rng.randbytes(rng.randrange(300))
        if index % 3 == 0:  # past the first line, so that the parser gets somewhere
            data = b"seed: 3\nmodel:\n  dropout: " + data
        path.write_bytes(data)
        check(f"seed {SEED + 1} case {index}", load_any, path)


HAND_PICKED_YAML = {
    "empty": b"",
    "blank lines": b"  \n\n",
    "list at top level": b"- a\n- b\n",
    "scalar at top level": b"42\n",
    "NUL bytes": b"\x00\x00",
    "control character": b"seed: 3\x07\n",
    "UTF-16": "seed: 3\n".encode("utf-16"),
    "Latin-1": "seed: 3  # caf\xe9\n".encode("latin-1"),
    "gzip": gzip.compress(b"seed: 3\n"),
    "deep flow list": b"seed: " + b"[" * 500 + b"]" * 500,  # deeper only takes longer: PyYAML's
    "deep flow mapping": b"seed: " + b"{a: " * 500 + b"1" + b"}" * 500,  # scanner is quadratic in it
    "deep block mapping": "".join("  " * i + f"k{i}:\n" for i in range(300)).encode(),
    "50 levels": b"model: " + b"[" * 50 + b"]" * 50,
    "alias bomb": b"a: &a [1,1,1,1,1,1,1,1,1]\n" + b"".join(
        b"%c: &%c [%s]\n" % (ord(n), ord(n), b",".join([b"*" + bytes([ord(n) - 1])] * 9)) for n in "bcdefgh")
        + b"model: {hidden_dims: *h}\n",
    "recursive alias": b"a: &a [*a]\n",
    "huge integer": b"seed: " + b"9" * 5000 + b"\n",
    "huge hex integer": b"seed: 0x" + b"f" * 4000 + b"\n",
    "integer over 64 bits": b"train: {batch_size: 18446744073709551616}\n",
    "huge float": b"optimizer: {lr: 1e999}\n",
    ".inf": b"optimizer: {lr: .inf}\n",
    "-.inf": b"model: {dropout: -.inf}\n",
    ".nan": b"data: {train_fraction: .nan}\n",
    "nan as text": b"optimizer: {lr: 'nan'}\n",
    ".nan as an integer": b"seed: .nan\n",
    "negative seed": b"seed: -1\n",
    "empty hidden_dims": b"model: {hidden_dims: []}\n",
    "zero width": b"model: {hidden_dims: [8, 0]}\n",
    "nan window": b"data: {channels: [{center: .nan, width: 80}]}\n",
    "month 13": b"seed: 2001-13-14\n",
    "explicit tag that does not fit": b"seed: !!int abc\n",
    "map tag on a scalar": b"model: !!map x\n",
    "python tag": b"seed: !!python/object/apply:os.system [true]\n",
    "binary tag": b"seed: !!binary aGVsbG8=\n",
    "two documents": b"seed: 1\n---\nseed: 2\n",
    "list as key": b"[a]: 1\n",
    "null key": b"~: 1\n",
    "true as key": b"yes: 1\n",
    "dotted key over a marker": b"experiment: {model: {a.b: {grid_search: [1, 2]}}}\nnum_train_steps: 10\n",
    "integer key over a marker": b"experiment: {model: {5: {grid_search: [1, 2]}}}\nnum_train_steps: 10\n",
    "tab indent": b"model:\n\tdropout: 0.1\n",
    "include a folder": b"include: .\n",
    "include a number": b"include: 3\n",
    "include a NUL": b'include: "a\\0b"\n',
    "include a long name": b"include: " + b"a" * 5000 + b"\n",
    "include binary": b"include: binary.bin\n",
    "include itself": b"include: case.yaml\n",
    "experiment is a list": b"experiment: [1]\nnum_train_steps: 10\n",
    "inf in a marker": b"experiment: {model: {dropout: {uniform: {lower: 0, upper: .inf}}}}\n"
                       b"num_train_steps: 10\n",
    "huge marker bound": b"experiment: {seed: {randint: {lower: 0, upper: 99999999999999999999999}}}\n",
    "nan resources": b"experiment: {}\nnum_train_steps: 10\nresources: {gpu: .nan}\n",
}


@pytest.mark.parametrize("name", list(HAND_PICKED_YAML))
def test_hand_picked_yaml(shipped, name):
    (shipped / "binary.bin").write_bytes(bytes(range(256)))
    path = shipped / "case.yaml"
    path.write_bytes(HAND_PICKED_YAML[name])
    check(name, load_any, path)


@pytest.mark.parametrize("name, message", [
    (".inf", "key 'optimizer.lr': expected a finite number"),
    (".nan", "key 'data.train_fraction': expected a finite number"),
    ("negative seed", "key 'seed': -1 is outside"),
    ("empty hidden_dims", "key 'model.hidden_dims': must not be empty"),
    ("zero width", "key 'model.hidden_dims.1': 0 is outside"),
    ("control character", ":1: character 0x07 is not allowed"),
    ("Latin-1", ":1: byte 0xe9 is not UTF-8"),
    ("deep flow list", "nested too deeply"),
    ("50 levels", "nested more than"),
    ("alias bomb", "more than 100,000 values"),
    ("huge integer", ":1: not valid YAML: cannot read"),
    ("integer over 64 bits", ":1: not valid YAML: integer '18446744073709551616' does not fit in 64 bits"),
    ("month 13", ":1: not valid YAML: cannot read '2001-13-14' as timestamp"),
    ("map tag on a scalar", ":1: not valid YAML: cannot read 'x' as map"),
    ("include a long name", "included file 'aaaa"),
    ("dotted key over a marker", ":1: a mapping key must be a plain name, got 'a.b'"),
])
def test_hand_picked_yaml_messages(shipped, name, message):
    path = shipped / "case.yaml"
    path.write_bytes(HAND_PICKED_YAML[name])
    with pytest.raises(ConfigError) as caught:
        load_any(path)
    assert str(caught.value).startswith(str(path)) and message in str(caught.value)


def test_folder_or_missing_file_as_yaml(shipped):
    with pytest.raises(ConfigError, match="a folder; give a YAML file"):
        load_any(shipped / "experiments")
    with pytest.raises(ConfigError, match="no such file"):
        load_any(shipped / "absent.yaml")


# --- labels CSV -------------------------------------------------------------------------------

@pytest.fixture
def labels_csv(tmp_path) -> bytes:
    """A labels CSV written like stage_2_train.csv: 12 images, six rows each."""
    rng = np.random.default_rng(SEED)
    ids = [f"ID_{rng.integers(16**9):09x}" for _ in range(12)]
    write_labels(tmp_path / "labels.csv", ids, rng.integers(0, 2, (12, len(CLASSES))))
    return (tmp_path / "labels.csv").read_bytes()


def read_checked(path: Path) -> None:
    labels = read_labels(path)
    assert labels.y.shape == (len(labels.ids), len(CLASSES)) and list(labels.ids) == sorted(labels.ids)


def test_mutated_labels_csv(tmp_path, labels_csv):
    rng = random.Random(SEED + 2)
    path = tmp_path / "stage_2_train.csv"
    for index in range(160):
        data = mutate(rng, labels_csv, CSV_TOKENS)
        if index % 8 == 0:
            data = gzip.compress(data)
        if index % 16 == 8:  # a gzip file cut off
            data = gzip.compress(data)[: rng.randrange(len(data) + 1)]
        path.write_bytes(data)
        check(f"seed {SEED + 2} case {index}", read_checked, path)


def test_random_bytes_as_labels_csv(tmp_path):
    rng = random.Random(SEED + 3)
    path = tmp_path / "stage_2_train.csv"
    for index in range(30):
        data = rng.randbytes(rng.randrange(400))
        if index % 2:
            data = b"ID,Label\n" + data
        path.write_bytes(data)
        check(f"seed {SEED + 3} case {index}", read_checked, path)


@pytest.mark.parametrize("data", [
    b"", b"\xef\xbb\xbf", b"ID,Label\n", b"ID,Label", b"ID,Label\r\n\r\n", b"\x1f\x8b", gzip.compress(b""),
    "ID,Label\n".encode("utf-16"), b"ID,Label\n" + b"a" * 100_000 + b"\n", b"a" * 100_000,
    b"ID,Label\rID_a_any,0\r", b"ID,Label\n\x00\x00\n", b"ID,Label\nID_a_b_c_any,1\n",
    b"ID,Label\nID_" + b"f" * 40 + b"_any,1\n", b"ID,Label\n,\n",
], ids=lambda data: repr(data[:20]))
def test_hand_picked_labels_csv(tmp_path, data):
    path = tmp_path / "stage_2_train.csv"
    path.write_bytes(data)
    with pytest.raises(DataError) as caught:
        read_labels(path)
    assert names_a_file(str(caught.value)) and len(str(caught.value)) < 600


def test_folder_as_labels_csv(tmp_path):
    with pytest.raises(DataError, match="cannot read the labels file"):
        read_labels(tmp_path)


# --- DICOM ------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom and torch comment on damaged input
def test_mutated_dicom(tiny_rsna, tmp_path):
    rng = random.Random(SEED + 4)
    slices = [p.read_bytes() for p in sorted((tiny_rsna / "stage_2_train").iterdir())[:4]]
    for index in range(80):
        data = bytearray(rng.choice(slices))
        if index % 4 == 0:  # the header matters more than the pixels: aim at it
            for _ in range(rng.randint(1, 12)):
                data[rng.randrange(128, 900)] = rng.randrange(256)
        else:
            data = bytearray(mutate(rng, bytes(data)))
        path = tmp_path / ("ID_fuzz.dcm.gz" if index % 10 == 0 else "ID_fuzz.dcm")
        path.write_bytes(gzip.compress(bytes(data)) if path.suffix == ".gz" else bytes(data))
        for reader in (read_slice, read_header):
            check(f"seed {SEED + 4} case {index} {reader.__name__}", reader, path)


HEADER_EDITS = {  # (old bytes, new bytes) in an explicit-VR little-endian slice
    "unknown VR in Rows": (b"\x28\x00\x10\x00US", b"\x28\x00\x10\x00U\x7f"),
    "unknown VR in PatientID": (b"\x10\x00\x20\x00LO", b"\x10\x00\x20\x00L\x07"),
    "two transfer syntaxes": (b"1.2.840.10008.1.2.1", b"1.2.840.10008.1\\2.1"),
    "two values of Columns": (b"\x28\x00\x11\x00US\x02\x00", b"\x28\x00\x11\x00US\x04\x00\x40\x00"),
    "no SamplesPerPixel": (b"\x28\x00\x02\x00US\x02\x00\x01\x00", b""),
}


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom and torch comment on damaged input
@pytest.mark.parametrize("name", list(HEADER_EDITS))
def test_damaged_dicom_header(tiny_rsna, tmp_path, name):
    old, new = HEADER_EDITS[name]
    data = sorted((tiny_rsna / "stage_2_train").iterdir())[0].read_bytes()
    assert data.count(old) == 1
    path = tmp_path / "ID_damaged.dcm"
    path.write_bytes(data.replace(old, new))
    check(name, read_header, path)  # the header alone may still be readable
    with pytest.raises(DicomError) as caught:
        read_slice(path)
    assert caught.value.path == path


@pytest.mark.parametrize("data", [b"", b"DICM", bytes(128) + b"DICM", bytes(128) + b"DICM" + bytes(64),
                                  bytes(range(256)) * 8],
                         ids=["empty", "DICM", "preamble", "zeros", "binary"])
def test_not_a_slice_is_one_dicom_error(tmp_path, data):
    path = tmp_path / "ID_x.dcm"
    path.write_bytes(data)
    with pytest.raises(DicomError) as caught:
        read_slice(path)
    assert caught.value.path == path
    check("header", read_header, path)  # an empty dataset has a (blank) header


# --- weights ----------------------------------------------------------------------------------

def tiny_model() -> torch.nn.Module:
    return build_model(ResNetConfig(hidden_dims=[8, 16]), in_channels=3)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom and torch comment on damaged input
def test_mutated_weights(tmp_path):
    rng = random.Random(SEED + 5)
    buffer = io.BytesIO()
    torch.save(tiny_model().state_dict(), buffer)
    good = buffer.getvalue()
    path = tmp_path / "weights.pt"
    for index in range(50):
        data = rng.randbytes(rng.randrange(300)) if index % 10 == 0 else mutate(rng, good)
        path.write_bytes(data)
        check(f"seed {SEED + 5} case {index}", load_weights, tiny_model(), path)


def _odd_states() -> dict[str, object]:
    state = tiny_model().state_dict()
    return {
        "a list": [1, 2], "None": None, "a tensor": torch.zeros(3), "integer keys": {1: torch.zeros(1)},
        "model entry is a list": {"model": [1]}, "nested twice": {"model": {"model": state}},
        "sparse": {k: v.to_sparse() if v.is_floating_point() and v.dim() else v for k, v in state.items()},
        "complex": {k: v.to(torch.complex64) if v.is_floating_point() else v for k, v in state.items()},
        "strings": {k: "x" for k in state},
    }


@pytest.mark.parametrize("name", list(_odd_states()))
def test_weights_of_the_wrong_kind(tmp_path, name):
    path = tmp_path / "weights.pt"
    torch.save(_odd_states()[name], path)
    with pytest.raises(UserError) as caught:
        load_weights(tiny_model(), path)
    assert str(caught.value).startswith(str(path))


@pytest.mark.parametrize("data", [b"", b"not weights", b"PK\x03\x04" + bytes(64)],
                         ids=["empty", "text", "zip"])
def test_unreadable_weights_say_so_in_one_line(tmp_path, data):
    path = tmp_path / "weights.pt"
    path.write_bytes(data)
    with pytest.raises(UserError) as caught:
        load_weights(tiny_model(), path)
    assert str(caught.value).startswith(f"{path}: not a readable PyTorch weights file")
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 300


def trained_folder(folder: Path, tiny_rsna: Path, weights: bytes | None = None) -> Path:
    """What `train --out` leaves, without the training: config.yaml and untrained (or given) weights."""
    folder.mkdir(parents=True, exist_ok=True)
    config = build_experiment(tiny_tree(tiny_rsna, folder.parent / "cache"), {})
    model = build_model(config.model, in_channels=len(parse_channels(config.data.channels)))
    torch.save(model.state_dict(), folder / "weights.pt")
    if weights is not None:
        (folder / "weights.pt").write_bytes(weights)
    (folder / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    return folder


@pytest.mark.parametrize("config", [b"", b"\x00\xff", b"- 1\n", b"model: " + b"[" * 500,
                                    b"model: {dropout: .nan}\n", b"seed: 2001-13-14\n",
                                    b"data: {channels: [bnain]}\n"],
                         ids=["empty", "binary", "list", "deep", "nan", "month 13", "unknown window"])
def test_bad_config_beside_weights(tiny_rsna, tmp_path, config):
    folder = trained_folder(tmp_path / "model", tiny_rsna)
    (folder / "config.yaml").write_bytes(config)
    with pytest.raises(UserError) as caught:
        load_trained(str(folder), None)
    assert str(folder) in str(caught.value)


# --- the command line -------------------------------------------------------------------------

def test_cli_on_bad_files_exits_0_or_2_without_traceback(tiny_rsna, tmp_path):
    good = trained_folder(tmp_path / "good", tiny_rsna)
    weights = (good / "weights.pt").read_bytes()
    empty = trained_folder(tmp_path / "empty", tiny_rsna, b"")
    cut = trained_folder(tmp_path / "cut", tiny_rsna, weights[: len(weights) // 2])
    slices = tmp_path / "slices"
    slices.mkdir()
    readable = sorted((tiny_rsna / "stage_2_test").iterdir())[:2]
    for source in readable:
        shutil.copy(source, slices)
    dicom = readable[0].read_bytes()
    (slices / "ID_0000000bad.dcm").write_bytes(b"not a DICOM file")
    (slices / "ID_0000000cut.dcm").write_bytes(dicom[:400])
    (slices / "ID_00000empty.dcm").write_bytes(b"")
    data = tmp_path / "data"
    shutil.copytree(tiny_rsna / "stage_2_train", data / "stage_2_train")
    (data / "stage_2_train.csv").write_bytes(bytes(range(256)) * 4)
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(yaml.safe_dump(tiny_tree(data, tmp_path / "cache")))
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)))
    (tmp_path / "deep.yaml").write_bytes(b"seed: " + b"[" * 500)
    runs = {  # arguments -> the exit status expected
        ("show-config", str(tmp_path / "binary.yaml")): 2,
        ("show-config", str(tmp_path / "deep.yaml")): 2,
        ("predict", "--model", str(empty), "--dicom-dir", str(slices), "--out", str(tmp_path / "a.csv")): 2,
        ("evaluate", "--model", str(cut / "weights.pt"), "--data-root", str(tiny_rsna)): 2,
        ("predict", "--model", str(good), "--dicom-dir", str(slices), "--out", str(tmp_path / "b.csv")): 0,
        ("preprocess", str(experiment), "--data-root", str(data)): 2,
    }
    with contextlib.ExitStack() as stack:  # all at once: most of each run is importing torch
        clis = {args: stack.enter_context(Cli(*args, log=tmp_path / f"cli-{i}.log"))
                for i, args in enumerate(runs)}
        for args, cli in clis.items():
            status = cli.wait(120)
            assert "Traceback" not in cli.output, (args, cli.output)
            assert status == runs[args], (args, status, cli.output)
            if status == 2:
                assert cli.output.count("error: ") == 1, (args, cli.output)
    submission = (tmp_path / "b.csv").read_text().splitlines()
    assert len(submission) == 1 + 5 * len(CLASSES)  # every slice, the unreadable ones too
