"""Prediction on real DICOM folders and evaluation on the experiment's own split, with a trained model."""

import csv
import dataclasses
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.pixels import get_decoder
from pydicom.uid import generate_uid

import ich_tune.data.folder
from ich_tune.cli import main
from ich_tune.config.schema import ExperimentConfig
from ich_tune.data.cache import open_cache
from ich_tune.data.channels import parse_channels, to_channels
from ich_tune.data.labels import CLASSES, read_labels, write_labels
from ich_tune.data.loader import validation_batches
from ich_tune.data.neighbours import with_neighbours
from ich_tune.data.prepare import load_splits, prepare_cache
from ich_tune.data.rsna import RSNA_ANY, RSNA_RATES, SUBMISSION_CSV
from ich_tune.errors import UserError
from ich_tune.experiment import build_experiment
from ich_tune.predict.evaluate import evaluate_split
from ich_tune.predict.outputs import SUBMISSION_CLIP, kaggle_rows, save_predictions, write_submission
from ich_tune.predict.scoring import predict_dicom
from ich_tune.tracking.references import load_trained
from ich_tune.training.device import place
from ich_tune.training.inference import predict_batches
from ich_tune.training.loop import train
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


def read_dicts(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def predict_folder(model: torch.nn.Module, config: ExperimentConfig, dicom_dir: Path,
                   batch_size: int | None = None, workers: int | None = None
                   ) -> tuple[list[str], np.ndarray, dict[str, str]]:
    """The Kaggle view of `predict_dicom`: ids sorted, probabilities [N, 6], and unreadable id -> reason."""
    return kaggle_rows(predict_dicom(model, config, dicom_dir, batch_size, workers))


def test_submission_matches_the_sample_submission(trained, tiny_rsna, tmp_path):
    _, model, config = trained
    ids, probs, unreadable = predict_folder(model, config, tiny_rsna / "stage_2_test", 4)
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
    ids, probs, unreadable = predict_folder(model, config, tiny_rsna / "stage_2_train", 8)
    cache = open_cache(prepare_cache(config.data))
    assert unreadable and set(unreadable) == set(cache.manifest["skipped"])  # the truncated file
    rows = np.flatnonzero(cache.valid)
    images = torch.from_numpy(cache.images[rows]).float() / 255.0
    with torch.no_grad():
        expected = torch.sigmoid(model(images)).numpy()
    where = {name: k for k, name in enumerate(ids)}
    np.testing.assert_allclose(probs[[where[i] for i in cache.ids[rows]]], expected, atol=1e-6)


def test_unreadable_file_is_listed_and_gets_the_label_rates(trained, tiny_rsna, tmp_path, said):
    _, model, config = trained
    folder = tmp_path / "data" / "stage_2_test"
    shutil.copytree(tiny_rsna / "stage_2_test", folder)
    (folder / "ID_0000000bad.dcm").write_bytes(b"not a DICOM file")
    ids, probs, unreadable = predict_folder(model, config, folder, batch_size=4)
    assert list(unreadable) == ["ID_0000000bad"] and "not a DICOM file" in unreadable["ID_0000000bad"]
    assert "ID_0000000bad" in ids and len(ids) == len(list(folder.iterdir()))
    rsna = [{**RSNA_RATES, "any": RSNA_ANY}[name] for name in CLASSES]
    np.testing.assert_allclose(probs[ids.index("ID_0000000bad")], rsna)  # no labels CSV beside it
    assert "RSNA's published label rates" in said[-1]

    shutil.copy(tiny_rsna / "stage_2_train.csv", tmp_path / "data")
    ids, probs, _ = predict_folder(model, config, folder, batch_size=4)
    rates = read_labels(tiny_rsna / "stage_2_train.csv").y.mean(axis=0)
    np.testing.assert_allclose(probs[ids.index("ID_0000000bad")], rates)


def test_evaluate_uses_the_training_split_or_every_slice(trained):
    _, model, config = trained
    val = evaluate_split(model, config, "val")
    splits = load_splits(prepare_cache(config.data), config.data)
    labels = splits.cache.labels[splits.val]
    assert val["positives_any"] == labels[:, -1].sum()
    assert val["accuracy_baseline"] == pytest.approx(1 - labels.mean())
    every = evaluate_split(model, config, "all", batch_size=5)
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
    (["predict", "--model", "{model}", "--dicom-dir", "{tmp}", "--out", "x.csv"], "an empty folder"),
    (["predict", "--model", "{model}", "--dicom-dir", "{test}", "--out", "x.csv", "--workers", "0"],
     "--workers 0: must be at least 1"),
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
    outcome = train(config, prepare_cache(config.data), tmp_path_factory.mktemp("context"))
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
    cache = with_neighbours(open_cache(prepare_cache(config.data)), config.data.context)
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

    ids, probs, unreadable = predict_folder(model, config, tiny_rsna / folder, batch_size=5,
                                            workers=1)  # in this process, where decoding is counted
    assert set(decoded.values()) == {1} and len(decoded) == len(ids)  # each file decoded once
    expected = loader_probs(model, config)
    assert set(expected) | set(unreadable) == set(ids)
    assert bool(unreadable) == (folder == "stage_2_train")  # the truncated slice: nobody's neighbour
    got = np.array([probs[ids.index(i)] for i in expected])
    np.testing.assert_allclose(got, np.array(list(expected.values())), atol=1e-6)
    alone = np.array(list(loader_probs(model, config, alone=True).values()))
    assert np.abs(got - alone).max() > 1e-3  # the neighbours matter: a wrong one would show


# Any folder: pydicom's own sample files, and a nested export without RSNA names.

SAMPLES = Path(get_testdata_file("CT_small.dcm")).parent
SAMPLE_COPIES = {  # name in the folder -> pydicom sample file
    "ct/IM0001": "CT_small.dcm",
    "ct/j2k": "693_J2KI.dcm",  # CT, JPEG 2000
    "ct/jls.dcm": "JPEGLSNearLossless_16.dcm",  # greyscale, no modality, JPEG-LS
    **{f"export/CT2/{n}": f"dicomdirtests/77654033/CT2/{n}" for n in ("17106", "17136", "17166", "17196")},
    "mr.dcm": "MR_small.dcm",
    "zipped/mr.gz": "zipMR.gz",
    "colour": "SC_jpeg_no_color_transform.dcm",
    "plan.dcm": "rtplan.dcm",
    "bare plan": "ExplVR_LitEndNoMeta.dcm",  # no preamble, no file meta: DICOM by its content
    "DICOMDIR": "dicomdirtests/DICOMDIR",
    "README.txt": "README.txt",
    "icc/crayons.icc": "crayons.icc",
    "test1.json": "test1.json",
}
SAMPLE_REASONS = {
    "mr.dcm": "modality is MR, not CT", "zipped/mr.gz": "modality is MR, not CT",
    "colour": "not a greyscale slice", "plan.dcm": "no pixel data", "bare plan": "no pixel data",
    "DICOMDIR": "no pixel data", "ct/truncated.dcm": "truncated pixel data",
}
NOT_DICOM = {"README.txt", "icc/crayons.icc", "test1.json"}


def expected_probs(model: torch.nn.Module, config: ExperimentConfig, path: Path) -> np.ndarray:
    """The model on a file decoded by pydicom alone (stored values, slope and intercept)."""
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    image = to_channels(hu, parse_channels(config.data.channels), config.data.size)
    with torch.no_grad():
        return torch.sigmoid(model(torch.from_numpy(image[None]).float() / 255.0))[0].numpy()


def test_pydicom_sample_files(trained, tmp_path):
    """CT slices under any name are scored; every other file is listed with its reason."""
    _, model, config = trained
    for name, sample in SAMPLE_COPIES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SAMPLES / sample, tmp_path / name)
    whole = (SAMPLES / "CT_small.dcm").read_bytes()
    (tmp_path / "ct" / "truncated.dcm").write_bytes(whole[:-1000])
    reasons = dict(SAMPLE_REASONS)
    decodable = {"ct/jls.dcm": "JPEGLSNearLossless_16.dcm", "ct/j2k": "693_J2KI.dcm"}
    for name, sample in decodable.items():  # scored where a decoder is installed, else refused
        if not get_decoder(pydicom.dcmread(SAMPLES / sample).file_meta.TransferSyntaxUID).is_available:
            reasons[name] = "no decoder is installed: pip install"
    prediction = predict_dicom(model, config, tmp_path, batch_size=3, workers=2)
    assert set(prediction.folder.skipped) == NOT_DICOM
    assert all("not a DICOM file" in r for r in prediction.folder.skipped.values())
    assert set(prediction.unreadable) == set(reasons)
    for name, reason in reasons.items():
        assert reason in prediction.unreadable[name], name
    scored = {image.file: k for k, image in enumerate(prediction.images)}
    assert set(scored) == set(SAMPLE_COPIES) - set(reasons) - NOT_DICOM
    for name, k in scored.items():
        ds, image = pydicom.dcmread(tmp_path / name), prediction.images[k]
        assert (image.image_id, image.instance_uid) == (ds.SOPInstanceUID, ds.SOPInstanceUID)
        assert (image.study_uid, image.series_uid) == (ds.StudyInstanceUID, ds.SeriesInstanceUID)
        assert image.z == pytest.approx(float(ds.ImagePositionPatient[2]))
        expected = expected_probs(model, config, tmp_path / name)
        np.testing.assert_allclose(prediction.probs[k], expected, atol=1e-5)

    out = tmp_path / "out" / "scores.csv"
    assert save_predictions(prediction, out) == "wide"
    rows = read_dicts(out)
    assert [r["file"] for r in rows] == [i.file for i in prediction.images]
    series = [r for r in rows if r["file"].startswith("export/CT2/")]  # one series of four slices
    assert sorted(series, key=lambda r: float(r["z"])) == sorted(series, key=lambda r: int(r["slice"]))
    assert sorted(int(r["slice"]) for r in series) == [1, 2, 3, 4]
    skipped = dict(read_rows(out.with_name("scores.skipped.csv"))[1:])
    assert set(skipped) == set(reasons) | NOT_DICOM


@pytest.fixture(scope="module")
def nested_export(tiny_rsna, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """tiny_rsna's train slices as a hospital might export them: study/series/NNNN[.dcm], numbered
    from the top of the head down (the reverse of z), new SOPInstanceUIDs, one study without
    preamble and file meta, and a README. Returns the folder and new UID -> RSNA id."""
    root = tmp_path_factory.mktemp("export")
    (root / "README.txt").write_text("Exported by a PACS\n")
    by_series = {}
    for path in sorted((tiny_rsna / "stage_2_train").iterdir()):
        ds = pydicom.dcmread(path)
        by_series.setdefault(ds.SeriesInstanceUID, []).append((float(ds.ImagePositionPatient[2]), path, ds))
    renamed = {}
    for study, members in enumerate(by_series.values()):
        for number, (_, path, ds) in enumerate(sorted(members, key=lambda m: -m[0]), start=1):
            uid = generate_uid(entropy_srcs=[path.name])
            renamed[uid] = path.name.removesuffix(".dcm")
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
            out = root / f"study{study}" / "series1" / (f"{number:04d}" + (".dcm" if study % 2 else ""))
            out.parent.mkdir(parents=True, exist_ok=True)
            if study == 0:
                ds.preamble = None
                del ds.file_meta
            ds.save_as(out, enforce_file_format=study != 0)
    return root, renamed


@pytest.mark.parametrize("context", [0, 1])
def test_nested_export_matches_the_rsna_folder(trained, trained_context, tiny_rsna, nested_export, tmp_path,
                                               context):
    """The same slices, renamed and nested, get the same probabilities as in the RSNA folder; each
    row carries its file's UIDs, and each study's summary its highest `any`."""
    model, config = (trained[1], trained[2]) if context == 0 else (trained_context[0].model.eval(),
                                                                    trained_context[1])
    root, renamed = nested_export
    ids, probs, unreadable = predict_folder(model, config, tiny_rsna / "stage_2_train", 8, workers=1)
    prediction = predict_dicom(model, config, root, batch_size=5, workers=1 + context)  # a pool with context
    assert prediction.folder.skipped.keys() == {"README.txt"} and not prediction.folder.rsna_named
    assert {renamed[i.image_id] for i in prediction.images} == set(ids) - set(unreadable)
    assert [renamed[pydicom.dcmread(root / f).SOPInstanceUID] for f in prediction.unreadable] == [*unreadable]
    got = np.array([probs[ids.index(renamed[i.image_id])] for i in prediction.images])
    np.testing.assert_allclose(prediction.probs, got, atol=1e-6)

    out = tmp_path / "scores.csv"
    assert save_predictions(prediction, out) == "wide"
    rows = read_dicts(out)
    assert len(rows) == len(ids) - len(unreadable) and list(rows[0])[-6:] == list(CLASSES)
    for row in rows:
        ds = pydicom.dcmread(root / row["file"], force=True)
        assert (row["image_id"], row["instance_uid"]) == (ds.SOPInstanceUID, ds.SOPInstanceUID)
        assert (row["study_uid"], row["series_uid"]) == (ds.StudyInstanceUID, ds.SeriesInstanceUID)
        assert int(row["instance_number"]) == ds.InstanceNumber
    studies = read_dicts(tmp_path / "scores.studies.csv")
    assert len(studies) == len({r["study_uid"] for r in rows}) == 8
    highest = [float(s["max_any"]) for s in studies]
    assert highest == sorted(highest, reverse=True)
    for study in studies:
        own = [r for r in rows if r["study_uid"] == study["study_uid"]]
        top = max(own, key=lambda r: float(r["any"]))
        assert int(study["images"]) == len(own)
        assert float(study["max_any"]) == pytest.approx(float(top["any"]), abs=1e-6)
        assert study["max_any_file"] == top["file"] and study["max_any_image"] == top["image_id"]


def test_cli_predict_picks_the_format_from_the_names(trained, tiny_rsna, nested_export, tmp_path, capsys):
    model = str(trained[0])
    root, _ = nested_export
    assert main(["predict", "--model", model, "--dicom-dir", str(root), "--out", str(tmp_path / "s.csv"),
                 "--workers", "1"]) == 0
    text = capsys.readouterr().out
    assert "images of 8 studies" in text and "README.txt: not a DICOM file" in text
    assert read_rows(tmp_path / "s.csv")[0][:2] == ["file", "image_id"]
    assert (tmp_path / "s.studies.csv").is_file() and (tmp_path / "s.skipped.csv").is_file()

    out, test = tmp_path / "kaggle.csv", str(tiny_rsna / "stage_2_test")
    assert main(["predict", "--model", model, "--dicom-dir", test, "--out", str(out), "--format", "kaggle",
                 "--workers", "1"]) == 0
    sample = read_rows(tiny_rsna / SUBMISSION_CSV)
    assert [r[0] for r in read_rows(out)] == [r[0] for r in sample]


def test_kaggle_format_needs_one_file_per_image(trained, tmp_path):
    _, model, config = trained
    for name in ("a/IM1", "b/IM1"):  # one slice exported twice
        (tmp_path / name).parent.mkdir()
        shutil.copy(SAMPLES / "CT_small.dcm", tmp_path / name)
    prediction = predict_dicom(model, config, tmp_path, workers=1)
    with pytest.raises(UserError, match=r"2 files hold image 1\.3\.6.*\(a/IM1, b/IM1\).*--format wide"):
        save_predictions(prediction, tmp_path / "kaggle.csv", "kaggle")
    assert save_predictions(prediction, tmp_path / "wide.csv") == "wide"
    assert [r["file"] for r in read_dicts(tmp_path / "wide.csv")] == ["a/IM1", "b/IM1"]
