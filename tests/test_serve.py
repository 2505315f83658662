"""The logged MLflow model on what hospitals send: DICOM files as base64 text, served by a real
`mlflow models serve`, scored as `predict` scores a folder of the same files, with the checkpoint's
calibration (temperatures, then thresholds) applied; a file that is no CT slice refuses the request.

`predict` does not apply a calibration, so the served probabilities are compared with its raw ones
put through the same Calibration.
"""

import base64
import contextlib
import io
import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydicom.data import get_testdata_file

from ich_tune.cli import main
from ich_tune.data.dicom import read_slice
from ich_tune.data.labels import CLASSES
from ich_tune.evaluation.assess import Calibration
from ich_tune.predict.scoring import predict_dicom
from ich_tune.tracking import pyfunc
from ich_tune.tracking.references import load_trained
from ich_tune.training.checkpoint import save_checkpoint
from tests.conftest import shared_cache, tiny_tree
from tests.services import model_server

SAMPLES = Path(get_testdata_file("CT_small.dcm")).parent
CT_SMALL = SAMPLES / "CT_small.dcm"  # 128 x 128: resized to the model's 32 x 32
SERIES = [SAMPLES / "dicomdirtests/77654033/CT2" / name for name in ("17166", "17106", "17196", "17136")]
FLAGS = [f"{name}_flag" for name in CLASSES]
NAME = "demo"


def trained_model(tiny_rsna: Path, folder: Path, **data) -> tuple[torch.nn.Module, object]:
    """`ich_tune train` of the tiny experiment (with `data` settings): the model and its config."""
    folder.mkdir(parents=True)
    experiment = folder / "experiment.yaml"
    experiment.write_text(yaml.safe_dump(tiny_tree(tiny_rsna, shared_cache(tiny_rsna), data=data)))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["train", str(experiment), "--out", str(folder)]) == 0
    return load_trained(str(folder / "weights.pt"), None)


@pytest.fixture(scope="module")
def trained(tiny_rsna, tmp_path_factory):
    return trained_model(tiny_rsna, tmp_path_factory.mktemp("serve") / "flat")


def predicted(model, config, files: list[Path], folder: Path) -> dict[str, np.ndarray]:
    """`predict` on a folder holding `files`: file name -> raw probabilities."""
    folder.mkdir(parents=True)
    for file in files:
        shutil.copy(file, folder / file.name)
    prediction = predict_dicom(model, config, folder, workers=1)
    assert not prediction.unreadable
    return {image.file: probs for image, probs in zip(prediction.images, prediction.probs, strict=True)}


def encoded(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def by_hand(raw: np.ndarray) -> Calibration:
    """Temperatures of every kind, and thresholds just either side of the scaled probabilities (one
    undefined), so that each flag shows which threshold was used; Youden's would flag everything."""
    calibration = Calibration([0.5, 0.8, 1.0, 1.3, 1.7, 2.5], {}, 0.95)
    scaled = calibration.apply(raw[None])[0]
    offsets = [-0.01, 0.01, np.nan, -0.01, 0.01, -0.01]
    calibration.thresholds = {"sensitivity": [float(p + d) for p, d in zip(scaled, offsets, strict=True)],
                              "youden": [0.0] * len(CLASSES)}
    return calibration


def logged(weights: Path, folder: Path, register: str | None = None) -> tuple[str, str, Path]:
    """`weights` logged as the MLflow model of a run in a SQLite store under `folder` (and registered
    as `register`@champion): the tracking URI, the model's URI and its files downloaded."""
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", uri)  # as mlflow.set_tracking_uri exports it: undone on leaving
        mlflow.set_tracking_uri(uri)
        try:
            experiment = mlflow.create_experiment("serve", artifact_location=str(folder / "artifacts"))
            with mlflow.start_run(experiment_id=experiment):
                model_uri = pyfunc.log_model(weights).model_uri
            if register:
                version = mlflow.register_model(model_uri, register).version
                MlflowClient(uri).set_registered_model_alias(register, "champion", version)
                model_uri = f"models:/{register}@champion"
            files = mlflow.artifacts.download_artifacts(model_uri, dst_path=str(folder / "model"))
        finally:
            mlflow.set_tracking_uri(None)  # back to the environment's store, which the tests name
    return uri, model_uri, Path(files)


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/invocations", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def test_the_served_model_scores_a_dicom_file_as_predict_and_its_calibration_do(trained, tmp_path):
    model, config = trained
    raw = predicted(model, config, [CT_SMALL], tmp_path / "folder")[CT_SMALL.name]
    calibration = by_hand(raw)
    weights = tmp_path / "calibrated.pt"
    save_checkpoint(weights, config, model, calibration=calibration.to_dict())
    tracking_uri, model_uri, _ = logged(weights, tmp_path / "mlflow", register=NAME)
    assert model_uri == f"models:/{NAME}@champion"
    batch = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    rows = [encoded(CT_SMALL), base64.b64encode(b"a letter, not a slice").decode(),
            encoded(SAMPLES / "MR_small.dcm"), "%%%"]  # a slice, then no DICOM, an MR, no base64

    with model_server(model_uri, tmp_path / "server", env={"MLFLOW_TRACKING_URI": tracking_uri}) as url:
        status, scored = post(url, {"dataframe_split": {"columns": ["dicom"], "data": [rows[:1]]}})
        refused, error = post(url, {"dataframe_split": {"columns": ["dicom"], "data": [[r] for r in rows]}})
        tensor_status, tensors = post(url, {"inputs": batch.tolist()})

    assert status == 200, scored
    [row] = scored["predictions"]
    assert list(row) == [*CLASSES, *FLAGS, "calibrated"]
    expected = calibration.apply(raw[None])[0]
    np.testing.assert_allclose([row[name] for name in CLASSES], expected, rtol=1e-5, atol=1e-6)
    assert [row[flag] for flag in FLAGS] == [True, False, False, True, False, True]
    assert [row[flag] for flag in FLAGS] == calibration.flags(expected[None])[0].tolist()
    assert row["calibrated"] is True

    assert refused == 400 and error["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "3 of 4 rows of 'dicom' are not CT slices this model can read: row 1: not a DICOM file (no " \
           "'DICM' marker after the 128-byte preamble); row 2: modality is MR, not CT; row 3: not base64 " \
           "text" in error["message"]

    assert tensor_status == 200, tensors  # a prepared batch, as before: raw probabilities only
    with torch.no_grad():
        direct = torch.sigmoid(model(torch.from_numpy(batch))).numpy()
    np.testing.assert_allclose(pd.DataFrame(tensors["predictions"])[list(CLASSES)], direct, rtol=1e-5)


def test_without_a_calibration_the_raw_probabilities_are_flagged_at_one_half(trained, tmp_path):
    model, config = trained
    raw = predicted(model, config, [CT_SMALL], tmp_path / "folder")[CT_SMALL.name]
    weights = tmp_path / "plain.pt"
    save_checkpoint(weights, config, model)
    _, _, folder = logged(weights, tmp_path / "mlflow")
    served = mlflow.pyfunc.load_model(str(folder))

    for given in (pd.DataFrame({"dicom": [CT_SMALL.read_bytes()]}), {"dicom": [encoded(CT_SMALL)]}):
        out = served.predict(given)
        np.testing.assert_allclose(out[list(CLASSES)].to_numpy()[0], raw, rtol=1e-5, atol=1e-7)
        assert out[FLAGS].to_numpy()[0].tolist() == (raw >= 0.5).tolist()
        assert out["calibrated"].tolist() == [False]
    batch = np.random.default_rng(1).random((3, 3, 32, 32), dtype=np.float32)
    assert list(served.predict(batch).columns) == list(CLASSES)
    with pytest.raises(MlflowException, match="row 0: not a DICOM file"):
        served.predict(pd.DataFrame({"dicom": [base64.b64encode(b"{}").decode()]}))

    meta = served.metadata
    assert meta.signature.inputs is None
    assert meta.signature.outputs.input_names() == [*CLASSES, *FLAGS, "calibrated"]
    example = meta.load_input_example(str(folder))
    assert list(example.columns) == ["dicom"]
    (tmp_path / "example.dcm").write_bytes(base64.b64decode(example["dicom"][0]))
    assert read_slice(tmp_path / "example.dcm")[1].shape == (64, 64)
    serving = json.loads((folder / "serving_input_example.json").read_text())
    assert serving["dataframe_split"]["columns"] == ["dicom"]


def test_a_context_model_sees_the_series_sent_with_a_slice_or_the_slice_alone(tiny_rsna, tmp_path):
    model, config = trained_model(tiny_rsna, tmp_path / "context", context=1)
    assert config.data.context == 1
    (tmp_path / "weights").mkdir()
    save_checkpoint(tmp_path / "weights" / pyfunc.WEIGHTS_FILE, config, model)
    served = pyfunc._load_pyfunc(str(tmp_path / "weights"))  # as mlflow.pyfunc.load_model calls it
    series = predicted(model, config, SERIES, tmp_path / "series")
    alone = predicted(model, config, SERIES[:1], tmp_path / "alone")

    out = served.predict(pd.DataFrame({"dicom": [encoded(path) for path in SERIES]}))
    expected = np.array([series[path.name] for path in SERIES])
    np.testing.assert_allclose(out[list(CLASSES)].to_numpy(), expected, rtol=1e-5, atol=1e-7)
    one = served.predict(pd.DataFrame({"dicom": [encoded(SERIES[0])]}))
    np.testing.assert_allclose(one[list(CLASSES)].to_numpy()[0], alone[SERIES[0].name], rtol=1e-5, atol=1e-7)
    assert np.abs(one[list(CLASSES)].to_numpy()[0] - expected[0]).max() > 1e-4  # the neighbours matter
