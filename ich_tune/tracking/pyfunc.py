"""A trained network as an MLflow model whose loading runs no code from the artifact.

MLflow's pyfunc flavor with a loader module: the model folder holds our weights.pt (read with
torch's weights_only, through checkpoint.load_checkpoint) and an MLmodel file that names this
installed module. `mlflow.pyfunc.load_model` imports it and calls `_load_pyfunc`; nothing in the
artifact is unpickled. The signature and input example tell MLflow's UI what the model takes (a
float32 batch [N, C, H, W], prepared as training prepared its slices) and what it returns (the six
probabilities of each slice, one column per class).
"""

from __future__ import annotations

import importlib.metadata
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ich_tune.data.labels import CLASSES
from ich_tune.training.checkpoint import load_checkpoint

LOADER = __name__  # what MLmodel names as the loader_module
EARLIER_LOADERS = ("ich_tune.mlflow_model",)  # this module's earlier name: --model still reads their weights
DATA_FOLDER = "weights"  # the model's data folder: data/weights/weights.pt
WEIGHTS_FILE = "weights.pt"


class Classifier:
    """What `mlflow.pyfunc.load_model` hands back: predict() on a float32 batch."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval()

    def predict(self, model_input: Any, params: dict | None = None):
        """[N, C, H, W] float32 -> a DataFrame of N rows, one probability column per class."""
        # only here: references imports this module; predict with a local weights file skips pandas
        import pandas as pd

        images = torch.from_numpy(np.ascontiguousarray(model_input, dtype=np.float32))
        with torch.no_grad():
            probs = torch.sigmoid(self.model(images).float()).numpy()
        return pd.DataFrame(probs, columns=list(CLASSES))


def _load_pyfunc(data_path: str) -> Classifier:
    """MLflow's entry point: the network from our own code, its weights from the file."""
    return Classifier(load_checkpoint(Path(data_path) / WEIGHTS_FILE).build())


def signature(in_channels: int, size: int):
    """Input: a float32 tensor [-1, C, S, S]; output: one float column per class."""
    # only here: references imports this module; predict with a local weights file skips MLflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, in_channels, size, size))]),
                          outputs=Schema([ColSpec("float", name) for name in CLASSES]))


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

    saved = load_checkpoint(weights)
    in_channels, size = saved.input["in_channels"], saved.input["size"]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / DATA_FOLDER
        data.mkdir()
        (data / WEIGHTS_FILE).write_bytes(weights.read_bytes())
        return mlflow.pyfunc.log_model(
            name=name, loader_module=LOADER, data_path=str(data), signature=signature(in_channels, size),
            input_example=np.zeros((1, in_channels, size, size), dtype=np.float32),
            pip_requirements=requirements(), metadata={"input": saved.input, "model": saved.model})
