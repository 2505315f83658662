"""A trained network as an MLflow model whose loading runs no code from the artifact, served on what
hospitals send: DICOM files.

MLflow's pyfunc flavor with a loader module: the model folder holds our weights.pt (read with
torch's weights_only, through checkpoint.load_checkpoint) and an MLmodel file that names this
installed module. `mlflow.pyfunc.load_model` imports it and calls `_load_pyfunc`; nothing in the
artifact is unpickled.

The model takes either of two inputs:
- a column `dicom` (a DataFrame, or a mapping from `dicom` to its values) holding one CT slice per
  row as a DICOM file, base64 text or bytes: what `mlflow models serve` gets as JSON
  (`{"dataframe_split": {"columns": ["dicom"], "data": [["<base64>"], ...]}}`). Each file is read and
  preprocessed as `predict` reads a folder (dicom.read_slice, then channels.to_channels at the
  checkpoint's channels and size) and its rows of one series are each other's neighbours for a 2.5D
  model (neighbours.neighbour_table, by z), so a request scores as `predict` scores a folder of the same
  files; a slice sent without its series has itself as every neighbour, as in `predict`. The answer
  is one row per file: the six probabilities, scaled by the temperatures fitted on validation when the
  checkpoint carries a calibration; six yes/no flags `<class>_flag`, at the thresholds chosen on
  validation for the target sensitivity (none where a class had no threshold), or at 0.5 without a
  calibration; and `calibrated`, which says which. A file that is not one CT slice (not DICOM, no
  pixels, another modality, undecodable) refuses the whole request, naming every such row and why:
  MLflow's scoring server answers 400 with that message. A reply with a row of blanks would be too
  easy to read as a negative.
- anything else: a float32 batch [N, C, S, S] already prepared as training prepares its slices (for
  callers that do their own preprocessing), answered with the six raw probabilities.

So the logged signature declares no input: MLflow enforces an input schema on every predict call
(PyFuncModel.predict -> _enforce_schema), a column schema turns a 4-D array into a DataFrame, which
fails, and a tensor schema cannot hold text. It declares the output columns, and the input example,
a slice of the phantom head as a base64 DICOM in column `dicom`, shows integrators the request
(serving_input_example.json in the model's artifacts); MLflow serves it once while logging.
"""

from __future__ import annotations

import base64
import binascii
import importlib.metadata
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydicom.uid import generate_uid

from ich_tune.data.channels import parse_channels, to_channels
from ich_tune.data.dicom import DicomError, read_slice
from ich_tune.data.labels import CLASSES
from ich_tune.data.loader import to_float
from ich_tune.data.neighbours import neighbour_table, stack_neighbours
from ich_tune.data.phantom import random_head
from ich_tune.data.synthetic import Image, Study, write_dicom
from ich_tune.evaluation.assess import Calibration
from ich_tune.training.checkpoint import load_checkpoint

if TYPE_CHECKING:
    import pandas as pd

LOADER = __name__  # what MLmodel names as the loader_module
EARLIER_LOADERS = ("ich_tune.mlflow_model",)  # this module's earlier name: --model still reads their weights
DATA_FOLDER = "weights"  # the model's data folder: data/weights/weights.pt
WEIGHTS_FILE = "weights.pt"
DICOM_COLUMN = "dicom"
FLAGS = tuple(f"{name}_flag" for name in CLASSES)
CALIBRATED = "calibrated"
FLAG_RULE = "sensitivity"  # of Calibration.thresholds: the operating point at the target sensitivity
UNCALIBRATED_THRESHOLD = 0.5


class Classifier:
    """What `mlflow.pyfunc.load_model` hands back: predict() on DICOM files or a float32 batch."""

    def __init__(self, model: torch.nn.Module, input_spec: dict,
                 calibration: Calibration | None = None) -> None:
        self.model = model.eval()
        self.input_spec = input_spec  # the checkpoint's {"channels", "size", "context", "in_channels"}
        self.calibration = calibration

    def predict(self, model_input: Any, params: dict | None = None) -> pd.DataFrame:
        """A `dicom` column -> probabilities and flags per file; [N, C, H, W] float32 -> a DataFrame of
        N rows, one probability column per class."""
        # only here: references imports this module; predict with a local weights file skips pandas
        import pandas as pd

        if isinstance(model_input, (pd.DataFrame, Mapping)) and DICOM_COLUMN in model_input:
            return self._scored_files(_values(model_input[DICOM_COLUMN]))
        images = torch.from_numpy(np.ascontiguousarray(model_input, dtype=np.float32))
        return pd.DataFrame(self._probabilities(images), columns=list(CLASSES))

    def _scored_files(self, files: list) -> pd.DataFrame:
        """One row per DICOM file: calibrated probabilities, flags and whether a calibration made them."""
        import pandas as pd  # only here, as in predict()

        probs = self._probabilities(self._inputs(files)).astype(np.float64)
        if self.calibration is None:
            flags = probs >= UNCALIBRATED_THRESHOLD
        else:
            probs = self.calibration.apply(probs)
            flags = self.calibration.flags(probs, FLAG_RULE)
        return pd.DataFrame({**dict(zip(CLASSES, probs.T, strict=True)),
                             **dict(zip(FLAGS, flags.astype(bool).T, strict=True)),
                             CALIBRATED: np.full(len(files), self.calibration is not None)})

    def _inputs(self, files: list) -> torch.Tensor:
        """[N, (2k+1) * C, S, S] float32, decoded as `predict` decodes a folder of these files."""
        channels, size = parse_channels(self.input_spec["channels"]), self.input_spec["size"]
        slices, headers, problems = [], [], []
        with tempfile.TemporaryDirectory(prefix="ich_tune-serve-") as tmp:
            for row, value in enumerate(files):
                path = Path(tmp) / f"{row}.dcm"
                try:
                    path.write_bytes(_file_bytes(value))
                    header, hu = read_slice(path)
                except (ValueError, DicomError) as err:
                    problems.append(f"row {row}: {err.reason if isinstance(err, DicomError) else err}")
                    continue
                headers.append(header)
                slices.append(to_channels(hu, channels, size))
        if problems:
            _refuse(f"{len(problems)} of {len(files)} rows of '{DICOM_COLUMN}' are not CT slices this "
                    f"model can read: {'; '.join(problems)}")
        if not slices:
            return torch.zeros(0, self.input_spec["in_channels"], size, size)
        rows = neighbour_table(np.array([h.series_uid for h in headers]), np.array([h.z for h in headers]),
                               np.ones(len(headers), bool), self.input_spec["context"])
        return to_float(torch.from_numpy(stack_neighbours(np.stack(slices), rows)))

    def _probabilities(self, images: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return torch.sigmoid(self.model(images).float()).numpy()


def _values(column: Any) -> list:
    """A column's values: a DataFrame's column, or what MLflow's `inputs` form maps the name to."""
    return [column] if isinstance(column, (str, bytes)) else list(column)


def _file_bytes(value: object) -> bytes:
    """A file sent as bytes, or as base64 text (line breaks allowed)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a DICOM file as base64 text or bytes, got {type(value).__name__}")
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except binascii.Error as err:
        raise ValueError(f"not base64 text ({err})") from None


def _refuse(message: str) -> None:
    """The request refused with `message`: MLflow's scoring server answers 400 with it."""
    from mlflow.exceptions import MlflowException  # only here: predict's start-up skips MLflow

    raise MlflowException.invalid_parameter_value(message)


def _load_pyfunc(data_path: str) -> Classifier:
    """MLflow's entry point: the network from our own code, its weights and calibration from the file."""
    saved = load_checkpoint(Path(data_path) / WEIGHTS_FILE)
    calibration = Calibration.from_dict(saved.calibration) if saved.calibration else None
    return Classifier(saved.build(), saved.input, calibration)


def signature():
    """No input (see the module's docstring); output: what a DICOM request gets, of which a batch of
    tensors gets only the probabilities."""
    # only here: references imports this module; predict with a local weights file skips MLflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(outputs=Schema([*(ColSpec("double", name) for name in CLASSES),
                                          *(ColSpec("boolean", name, required=False) for name in FLAGS),
                                          ColSpec("boolean", CALIBRATED, required=False)]))


def example_dicom() -> bytes:
    """A 64 px slice through the middle of the phantom head, as a CT DICOM file: the input example."""
    study_uid, series_uid, instance_uid = (generate_uid(entropy_srcs=["ich_tune input example", part])
                                           for part in ("study", "series", "instance"))
    study = Study(patient="example", uid=study_uid, series=series_uid,
                  head=random_head(np.random.default_rng(0)), bleeds=(), slices=1, fov_mm=220.0,
                  window=(40, 80))
    image = Image(id=instance_uid, split="test", study=study, z=0, size=64, encoding="plain",
                  multi_window=False, truncated=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "example.dcm"
        write_dicom(image, image.render()[0], path)
        return path.read_bytes()


def requirements() -> list[str]:
    """What a model server must install: torch, numpy and pandas at the versions that logged it.

    This package, whose loader the model names, is left out: pip would fetch whatever a package index
    holds under its name, which need not be this code. The serving environment must have it installed
    (as the nodes' image does), e.g. `mlflow models serve --env-manager local` in such an environment.
    """
    versions = {name: importlib.metadata.version(name).split("+")[0] for name in ("torch", "numpy", "pandas")}
    return [f"{name}=={version}" for name, version in versions.items()]


def log_model(weights: Path, name: str = "model"):
    """Log `weights` (a file written by checkpoint.save_checkpoint) as an MLflow model of the active
    run; returns MLflow's ModelInfo (its model_uri is models:/<model_id>)."""
    # only here: references imports this module; predict with a local weights file skips MLflow
    import mlflow.pyfunc
    import pandas as pd

    saved = load_checkpoint(weights)
    example = pd.DataFrame({DICOM_COLUMN: [base64.b64encode(example_dicom()).decode("ascii")]})
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / DATA_FOLDER
        data.mkdir()
        (data / WEIGHTS_FILE).write_bytes(weights.read_bytes())
        return mlflow.pyfunc.log_model(
            name=name, loader_module=LOADER, data_path=str(data), signature=signature(),
            input_example=example, pip_requirements=requirements(),
            metadata={"input": saved.input, "model": saved.model})
