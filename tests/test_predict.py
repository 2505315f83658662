"""Prediction on real DICOM folders and evaluation on the experiment's own split, with a trained model."""

import csv
import dataclasses
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import ich_tune.data.folder
from ich_tune.cli import main
from ich_tune.config import build_experiment
from ich_tune.config.schema import ExperimentConfig
from ich_tune.data.cache import open_cache
from ich_tune.data.context import with_context
from ich_tune.data.labels import CLASSES, read_labels, write_labels
from ich_tune.data.loader import validation_batches
from ich_tune.data.prepare import load_splits, prepare_cache
from ich_tune.data.synthetic import RSNA_ANY, RSNA_RATES
from ich_tune.device import place
from ich_tune.errors import UserError
from ich_tune.predict import SUBMISSION_CLIP, evaluate_split, predict_folder, write_submission
from ich_tune.train import predict_batches, train
from ich_tune.weights import load_trained
from tests.conftest import tiny_tree
from tests.test_weights import save_trained

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # RSNA's ID_ UIDs


@pytest.fixture(scope="module")
def trained(tiny_rsna, tmp_path_factory):
    """A model trained for a few steps on tiny_rsna: (train --out folder, model, its config)."""
    folder, _ = save_trained(tiny_rsna, tmp_path_factory.mktemp("trained"))
    model, config = load_trained(str(folder), None)
    return folder, model, config


def read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def quiet(*_) -> None:
    pass


def test_submission_matches_the_sample_submission(trained, tiny_rsna, tmp_path):
    _, model, config = trained
    ids, probs, unreadable = predict_folder(model, config, tiny_rsna / "stage_2_test", 4, log=quiet)
    assert not unreadable and probs.shape == (len(ids), 6)
    write_submission(tmp_path / "submission.csv", ids, probs)
    rows = read_rows(tmp_path / "submission.csv")
    sample = read_rows(tiny_rsna / "stage_2_sample_submission.csv")
    assert rows[0] == sample[0] == ["ID", "Label"]
    assert [r[0] for r in rows] == [r[0] for r in sample]  # same rows, same order
    assert len(rows) - 1 == 6 * len(ids) and [r[0].rsplit("_", 1)[1] for r in rows[1:7]] == list(CLASSES)
    values = np.array([float(r[1]) for r in rows[1:]])
    assert np.all((values >= SUBMISSION_CLIP) & (values <= 1 - SUBMISSION_CLIP))
    assert values.std() > 0  # real predictions, not a constant


def test_submission_clips_and_replaces_atomically(tmp_path):
    out = tmp_path / "sub" / "submission.csv"
    write_submission(out, ["ID_b", "ID_a"], np.array([[0.0] * 6, [1.0] * 6]))
    rows = read_rows(out)
    assert rows[1] == ["ID_a_epidural", "0.999999"] and rows[7] == ["ID_b_epidural", "1e-06"]
    assert [p.name for p in out.parent.iterdir()] == ["submission.csv"]  # no temporary file left


def test_submission_that_cannot_be_written_is_a_user_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="cannot write the submission"):
        write_submission(tmp_path / "file" / "submission.csv", ["ID_a"], np.zeros((1, 6)))


def test_predictions_see_the_pixels_training_saw(trained, tiny_rsna):
    """The same slice, decoded for prediction and from the training cache, gives the same output."""
    _, model, config = trained
    ids, probs, unreadable = predict_folder(model, config, tiny_rsna / "stage_2_train", 8, log=quiet)
    cache = open_cache(prepare_cache(config.data, log=quiet))
    assert unreadable and set(unreadable) == set(cache.manifest["skipped"])  # the truncated file
    rows = np.flatnonzero(cache.valid)
    images = torch.from_numpy(cache.images[rows]).float() / 255.0
    with torch.no_grad():
        expected = torch.sigmoid(model(images)).numpy()
    where = {name: k for k, name in enumerate(ids)}
    np.testing.assert_allclose(probs[[where[i] for i in cache.ids[rows]]], expected, atol=1e-6)


def test_unreadable_file_is_listed_and_gets_the_label_rates(trained, tiny_rsna, tmp_path):
    _, model, config = trained
    folder = tmp_path / "data" / "stage_2_test"
    shutil.copytree(tiny_rsna / "stage_2_test", folder)
    (folder / "ID_0000000bad.dcm").write_bytes(b"not a DICOM file")
    logged = []
    ids, probs, unreadable = predict_folder(model, config, folder, batch_size=4, log=logged.append)
    assert list(unreadable) == ["ID_0000000bad"] and "not a DICOM file" in unreadable["ID_0000000bad"]
    assert "ID_0000000bad" in ids and len(ids) == len(list(folder.iterdir()))
    rsna = [{**RSNA_RATES, "any": RSNA_ANY}[name] for name in CLASSES]
    np.testing.assert_allclose(probs[ids.index("ID_0000000bad")], rsna)  # no labels CSV beside it
    assert "RSNA's published label rates" in logged[-1]

    shutil.copy(tiny_rsna / "stage_2_train.csv", tmp_path / "data")
    ids, probs, _ = predict_folder(model, config, folder, batch_size=4, log=quiet)
    rates = read_labels(tiny_rsna / "stage_2_train.csv").y.mean(axis=0)
    np.testing.assert_allclose(probs[ids.index("ID_0000000bad")], rates)


def test_evaluate_uses_the_training_split_or_every_slice(trained):
    _, model, config = trained
    val = evaluate_split(model, config, "val", log=quiet)
    splits = load_splits(prepare_cache(config.data, log=quiet), config.data, log=quiet)
    labels = splits.cache.labels[splits.val]
    assert val["positives_any"] == labels[:, -1].sum()
    assert val["accuracy_baseline"] == pytest.approx(1 - labels.mean())
    every = evaluate_split(model, config, "all", batch_size=5, log=quiet)
    assert every["positives_any"] == splits.cache.labels[splits.cache.valid][:, -1].sum()


def test_cli_predict_and_evaluate(trained, tiny_rsna, tmp_path, capsys):
    folder, _, _ = trained
    out = tmp_path / "submission.csv"
    assert main(["predict", "--model", str(folder), "--dicom-dir", str(tiny_rsna / "stage_2_test"),
                 "--out", str(out)]) == 0
    assert len(read_rows(out)) == len(read_rows(tiny_rsna / "stage_2_sample_submission.csv"))
    assert main(["evaluate", "--model", str(folder / "weights.pt")]) == 0
    text = capsys.readouterr().out
    assert "on the validation split of" in text
    assert "all-neg" in text and "accuracy (any)" in text and "RSNA log loss" in text


@pytest.mark.parametrize("args, message", [
    (["predict", "--model", "nope.pt", "--dicom-dir", ".", "--out", "x.csv"], "error: model 'nope.pt'"),
    (["predict", "--model", "{model}", "--dicom-dir", "{tmp}/none", "--out", "x.csv"], "no such folder"),
    (["predict", "--model", "{model}", "--dicom-dir", "{tmp}", "--out", "x.csv"], "no DICOM files there"),
    (["predict", "--model", "{model}", "--dicom-dir", "{test}", "--out", "x.csv", "--batch-size", "0"],
     "--batch-size 0: must be at least 1"),
    (["predict", "--model", "{model}", "--dicom-dir", "{test}", "--out", "{tmp}"],
     "a folder; give the submission file to write"),
    (["evaluate", "--model", "{model}", "--data-root", "{tmp}"], "no stage_2_train.csv"),
    (["evaluate", "--model", "search:demo", "--tracking-uri", "sqlite:///{tmp}/mlflow.db"],
     "no MLflow database"),
])
def test_cli_bad_input_exits_2_with_one_line(trained, tiny_rsna, tmp_path, capsys, args, message):
    values = {"model": trained[0], "tmp": tmp_path, "test": tiny_rsna / "stage_2_test"}
    assert main([a.format(**values) for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.fixture(scope="module")
def trained_context(tiny_rsna, tmp_path_factory):
    """A model trained for a few steps with data.context 1, on the cache `trained` uses: (outcome, config)."""
    config = build_experiment(tiny_tree(tiny_rsna, tiny_rsna.parent / "cache-for-weights",
                                        data={"context": 1}), {})
    outcome = train(config, prepare_cache(config.data, log=quiet), tmp_path_factory.mktemp("context"),
                    log=quiet)
    return outcome, config


def test_training_with_context_feeds_the_neighbours_as_channels(trained_context):
    outcome, _ = trained_context
    stem = next(m for m in outcome.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert stem.in_channels == 9  # 3 windows x (slice below, the slice, slice above)
    assert outcome.steps == 6 and [m["step"] for m in outcome.history] == [3, 6]
    assert np.isfinite(outcome.metrics["val_log_loss"])


def loader_probs(model: torch.nn.Module, config: ExperimentConfig, alone: bool = False) -> dict:
    """Probabilities by id of every decoded slice of the config's dataset, through the training
    loader; with `alone`, every neighbour replaced by the slice itself."""
    cache = with_context(open_cache(prepare_cache(config.data, log=quiet)), config.data.context)
    if alone:
        cache.neighbours = np.repeat(np.arange(len(cache.ids))[:, None], 3, axis=1)
    rows = np.flatnonzero(cache.valid)
    probs, _ = predict_batches(model, validation_batches(cache, rows, 8), place(config.train))
    return dict(zip(cache.ids[rows], probs, strict=True))


@pytest.mark.parametrize("folder", ["stage_2_train", "stage_2_test"])
def test_context_predictions_match_the_training_loader(trained_context, tiny_rsna, tmp_path, monkeypatch,
                                                       folder):
    """predict rebuilds the series of a folder from its headers; the training loader takes them from
    the cache's index. The test folder is made a dataset of its own (labels all 0) for the loader."""
    outcome, config = trained_context
    model = outcome.model.eval()
    if folder == "stage_2_test":
        shutil.copytree(tiny_rsna / folder, tmp_path / "test" / "stage_2_train")
        ids = sorted(p.name.removesuffix(".dcm") for p in (tmp_path / "test" / "stage_2_train").iterdir())
        write_labels(tmp_path / "test" / "stage_2_train.csv", ids, np.zeros((len(ids), 6), np.uint8))
        data = dataclasses.replace(config.data, root=str(tmp_path / "test"), cache_dir=str(tmp_path / "c"))
        config = dataclasses.replace(config, data=data)
    decoded = Counter()
    read_hu = ich_tune.data.folder.read_hu
    monkeypatch.setattr(ich_tune.data.folder, "read_hu", lambda path: decoded.update([path]) or read_hu(path))

    ids, probs, unreadable = predict_folder(model, config, tiny_rsna / folder, batch_size=5, log=quiet,
                                            workers=1)  # in this process, where decoding is counted
    assert set(decoded.values()) == {1} and len(decoded) == len(ids)  # each file decoded once
    expected = loader_probs(model, config)
    assert set(expected) | set(unreadable) == set(ids)
    assert bool(unreadable) == (folder == "stage_2_train")  # the truncated slice: nobody's neighbour
    got = np.array([probs[ids.index(i)] for i in expected])
    np.testing.assert_allclose(got, np.array(list(expected.values())), atol=1e-6)
    alone = np.array(list(loader_probs(model, config, alone=True).values()))
    assert np.abs(got - alone).max() > 1e-3  # the neighbours matter: a wrong one would show
