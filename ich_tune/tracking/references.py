"""Where trained weights come from: a local file or folder, an MLflow run, a search's best model, or an
MLflow model (logged or registered).

`predict` and `evaluate` take one --model argument in any of these forms. They need the weights and
the experiment config that trained them: the config rebuilds the same network and the same input
channels and size, so a model is never fed pixels prepared differently from its training data.
MLflow is imported only for the MLflow forms, so a local weights file loads without its start-up cost.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ich_tune.config.loader import parse_yaml, read_text
from ich_tune.config.schema import ExperimentConfig
from ich_tune.data.channels import parse_channels
from ich_tune.data.neighbours import input_channels
from ich_tune.errors import ConfigError, UserError
from ich_tune.evaluation.assess import Calibration
from ich_tune.experiment import build_experiment, load_experiment
from ich_tune.models import build_model
from ich_tune.tracking import pyfunc
from ich_tune.tracking.client import has_artifact, mlflow_client, search_experiment, tracking_errors, ui_hint
from ich_tune.tracking.tags import TAG_PARENT, TAG_SEARCH_DIR
from ich_tune.training.checkpoint import CHECKPOINT_FILE, load_checkpoint, load_state

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

WEIGHTS_FILE = "weights.pt"  # what `train` writes and a search's parent run holds under best/
CONFIG_FILE = "config.yaml"
WEIGHTS_ARTIFACT = f"best/{WEIGHTS_FILE}"
CONFIG_ARTIFACT = f"best/{CONFIG_FILE}"
RESOLVED_ARTIFACT = "search/resolved.yaml"  # a search's parent run: the search file as it ran
RAY_PARAMS = "params.json"  # a Ray trial folder's copy of the trial's experiment tree
RUN_ID = re.compile(r"[0-9a-f]{32}")
MODEL_ID = re.compile(r"m-[0-9a-f]{32}")  # MLflow 3's logged models: models:/<model id>
FORMS = ("a weights file (.pt), a checkpoint or train --out folder, an MLflow run id (32 hex digits), "
         "runs:/<run id>, search:<name>, models:/<name>@<alias>, models:/<name>/<version> or "
         "models:/<model id>")


def resolve_weights(spec: str, tracking_uri: str | None, dest: Path) -> tuple[Path, dict | None]:
    """A local weights file for `spec` (downloaded into `dest` if remote) and the experiment tree
    that trained it, or None where no config is found."""
    if spec.startswith("search:"):
        with tracking_errors():
            return _from_search(spec.removeprefix("search:"), tracking_uri, dest)
    if spec.startswith("models:/"):
        with tracking_errors():
            return _from_model(spec, tracking_uri, dest), None  # the weights describe their experiment
    path = Path(spec).expanduser()
    if path.exists():
        return _from_path(path)
    run_id = spec.removeprefix("runs:/").rstrip("/")
    if RUN_ID.fullmatch(run_id):
        with tracking_errors():
            return _from_run(run_id, tracking_uri, dest)
    raise UserError(f"model '{spec}': no such file or folder, and not an MLflow run id. Give {FORMS}.")


def load_trained(spec: str, tracking_uri: str | None,
                 config_path: Path | None = None) -> tuple[torch.nn.Module, ExperimentConfig]:
    """The trained network in eval mode and its experiment config (`config_path` overrides it)."""
    trained = load_model(spec, tracking_uri, config_path)
    return trained.model, trained.config


@dataclass
class Trained:
    model: torch.nn.Module  # in eval mode
    config: ExperimentConfig
    calibration: Calibration | None  # fitted on validation when the search published it


def load_model(spec: str, tracking_uri: str | None, config_path: Path | None = None) -> Trained:
    """The trained network, its experiment config (`config_path` overrides it) and its calibration."""
    with tempfile.TemporaryDirectory(prefix="ich_tune-weights-") as tmp:
        weights, tree = resolve_weights(spec, tracking_uri, Path(tmp))
        checkpoint = load_checkpoint(weights)
        tree = checkpoint.experiment or tree  # files of an older version: the config.yaml beside them
        if config_path is not None:
            config, _ = load_experiment(config_path)
        elif tree is None:
            raise UserError(f"model '{spec}': {weights} does not describe its experiment and has no "
                            f"{CONFIG_FILE} beside it, so the network and its input are unknown; pass "
                            "--config with the experiment file it was trained with.")
        else:
            config = _build(tree, spec)
        model = build_model(config.model, input_channels(config.data))
        load_state(model, checkpoint)
    calibration = Calibration.from_dict(checkpoint.calibration) if checkpoint.calibration else None
    return Trained(model.eval(), config, calibration)


def _from_path(path: Path) -> tuple[Path, dict | None]:
    if path.is_dir():
        found = [path / name for name in (CHECKPOINT_FILE, WEIGHTS_FILE) if (path / name).is_file()]
        if not found:
            raise UserError(f"model '{path}': a folder without {CHECKPOINT_FILE} or {WEIGHTS_FILE}. "
                            f"Give {FORMS}.")
        path = found[0]
    return path, _config_near(path)


def _config_near(weights: Path) -> dict | None:
    """config.yaml beside the weights or one folder up (train's checkpoint_N/ folders), else a Ray
    trial's params.json one folder up (its checkpoint_N/ folders)."""
    for folder in (weights.parent, weights.parent.parent):
        if (folder / CONFIG_FILE).is_file():
            return _read_tree(folder / CONFIG_FILE)
    params = weights.parent.parent / RAY_PARAMS
    return _read_tree(params) if params.is_file() else None


def _read_tree(path: Path) -> dict:
    """A config.yaml through the config loader (line numbers, size limits); a params.json as JSON."""
    if path.suffix != ".json":
        tree, _ = parse_yaml(read_text(path), str(path))
    else:
        try:
            tree = json.loads(path.read_bytes())
        except (OSError, ValueError, RecursionError) as err:
            raise UserError(f"{path}: cannot read the experiment config ({err}).") from None
    if not isinstance(tree, dict):
        raise UserError(f"{path}: expected an experiment config (a mapping), got {type(tree).__name__}.")
    return tree


def _build(tree: dict, source: str) -> ExperimentConfig:
    try:
        config = build_experiment(tree, {})
        parse_channels(config.data.channels)  # checked here, where the message can name the model
        return config
    except ConfigError as err:
        raise ConfigError(f"the config of model '{source}': {err}") from None


def _from_run(run_id: str, tracking_uri: str | None, dest: Path) -> tuple[Path, dict | None]:
    """best/weights.pt and best/config.yaml of a search's parent run."""
    # only here: predict with a local weights file skips MLflow's start-up
    from mlflow.exceptions import MlflowException

    client, uri = mlflow_client(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise UserError(f"MLflow run {run_id} not found in {uri}; check the id (`{ui_hint(uri)}` lists "
                        "runs) or pass --tracking-uri.") from None
    files = {Path(f.path).name for f in client.list_artifacts(run_id, "best")}
    if WEIGHTS_FILE not in files:
        parent = run.data.tags.get(TAG_PARENT)
        hint = (f"it is one trial of search run {parent}: use that id, or search:<name>" if parent
                else "only a search's parent run holds the best weights, once the search has finished")
        raise UserError(f"MLflow run {run_id} has no {WEIGHTS_ARTIFACT} artifact; {hint}.")
    weights = Path(client.download_artifacts(run_id, WEIGHTS_ARTIFACT, str(dest)))
    tree = None
    if CONFIG_FILE in files:
        tree = _read_tree(Path(client.download_artifacts(run_id, CONFIG_ARTIFACT, str(dest))))
    return weights, tree


def _from_search(name: str, tracking_uri: str | None, dest: Path) -> tuple[Path, dict | None]:
    """The latest finished search of that name that saved its best weights."""
    client, uri = mlflow_client(tracking_uri)
    experiment = search_experiment(client, uri, name, f"search:{name}: no search of that name")
    parents = client.search_runs([experiment.experiment_id],
                                 f"tags.`{TAG_SEARCH_DIR}` LIKE '%' AND attributes.status = 'FINISHED'",
                                 order_by=["attributes.start_time DESC"])
    for run in parents:
        if has_artifact(client, run.info.run_id, WEIGHTS_ARTIFACT):
            return _from_run(run.info.run_id, uri, dest)
    raise UserError(f"search:{name}: no finished search run with {WEIGHTS_ARTIFACT} in {uri}; wait for "
                    "the search to finish, or give a trial's checkpoint folder instead.")


def _from_model(spec: str, tracking_uri: str | None, dest: Path) -> Path:
    """The weights file inside an MLflow model this project logged (ich_tune.tracking.pyfunc)."""
    # only here: predict with a local weights file skips MLflow's start-up
    from mlflow.artifacts import download_artifacts
    from mlflow.models import Model

    client, uri = mlflow_client(tracking_uri)
    root = _model_location(client, spec.removeprefix("models:/").rstrip("/"), spec, uri)
    mlmodel = download_artifacts(artifact_uri=f"{root}/MLmodel", dst_path=str(dest), tracking_uri=uri)
    meta = Model.load(mlmodel)
    flavor = meta.flavors.get("python_function", {})
    if flavor.get("loader_module") not in (pyfunc.LOADER, *pyfunc.EARLIER_LOADERS) or "data" not in flavor:
        raise UserError(f"model '{spec}': not a model ich_tune logged (flavors: {', '.join(meta.flavors)}); "
                        "its weights cannot be read without running its code. Give a search's run id or "
                        "search:<name> instead.")
    path = f"{root}/{flavor['data']}/{pyfunc.WEIGHTS_FILE}"
    return Path(download_artifacts(artifact_uri=path, dst_path=str(dest), tracking_uri=uri))


def _model_location(client: MlflowClient, ref: str, spec: str, uri: str) -> str:
    """Where the model's files are, for a logged model id, NAME@ALIAS or NAME/VERSION that exists;
    otherwise a message that lists what does."""
    # only here: predict with a local weights file skips MLflow's start-up
    from mlflow.exceptions import MlflowException

    if MODEL_ID.fullmatch(ref):
        try:
            return client.get_logged_model(ref).artifact_location
        except MlflowException:
            raise UserError(f"model '{spec}': no logged model {ref} in {uri}; pass --tracking-uri if it was "
                            "logged elsewhere.") from None
    name, _, alias = ref.partition("@")
    version = ""
    if not alias:
        name, _, version = ref.partition("/")
    if not name or not (alias or version.isdigit()):
        raise UserError(f"model '{spec}': give models:/<name>@<alias>, models:/<name>/<version> or "
                        "models:/<model id>.")
    try:
        registered = client.get_registered_model(name)
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models())
        raise UserError(f"model '{spec}': no registered model '{name}' in {uri} (registered: "
                        f"{', '.join(names) or 'none yet'}).") from None
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    if (alias and alias not in registered.aliases) or (version and int(version) not in versions):
        missing = f"alias '{alias}'" if alias else f"version {version}"
        aliases = ", ".join(f"{a} -> version {v}" for a, v in sorted(registered.aliases.items())) or "none"
        raise UserError(f"model '{spec}': {name} has no {missing} (aliases: {aliases}; versions: "
                        f"{', '.join(map(str, versions)) or 'none'}).")
    version = registered.aliases[alias] if alias else version
    return client.get_model_version_download_uri(name, version)
