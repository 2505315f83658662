"""Every form of --model resolves to real trained weights and their config; bad ones say what was tried.

The MLflow store is a real SQLite database in a temporary folder, filled the way a search fills it:
a parent run with best/weights.pt and best/config.yaml, a child run per trial.
"""

import dataclasses
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.entities import Metric, RunStatus
from mlflow.tracking import MlflowClient

from ich_tune.config import build_experiment
from ich_tune.data.prepare import prepare_cache
from ich_tune.errors import UserError
from ich_tune.tracking import TAG_ENDED, TAG_PARENT, TAG_SEARCH_DIR, TAG_TRIAL_ID, flatten
from ich_tune.train import CHECKPOINT_FILE, train
from ich_tune.weights import load_trained, resolve_weights
from tests.conftest import tiny_tree


def save_trained(root: Path, folder: Path) -> tuple[Path, torch.nn.Module]:
    """What `ich_tune train --out folder` leaves: weights.pt, config.yaml and its last checkpoint.

    The cache sits beside the dataset, so the test modules that train build it once per session.
    """
    config = build_experiment(tiny_tree(root, root.parent / "cache-for-weights"), {})
    outcome = train(config, prepare_cache(config.data, log=lambda *_: None), folder, log=lambda *_: None)
    torch.save(outcome.model.state_dict(), folder / "weights.pt")
    (folder / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    return folder, outcome.model.eval()


@pytest.fixture(scope="module")
def trained(tiny_rsna, tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    return save_trained(tiny_rsna, tmp_path_factory.mktemp("trained"))


def record_search(uri: str, name: str, trained_dir: Path | None, trials: list[dict],
                  status: str = "FINISHED", tags: dict | None = None) -> str:
    """A parent run as tracking.py writes it (best/ artifacts only if `trained_dir`), one child per trial.

    A trial is {"id", "params", "metrics": {name: [values at steps 1, 2, ...]}, "status", "stopped"}.
    """
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(name)
    artifacts = Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts" / name  # not ./mlruns
    experiment = found.experiment_id if found else client.create_experiment(name, artifacts.as_uri())
    parent = client.create_run(experiment, run_name="r", tags={TAG_SEARCH_DIR: f"/runs/{name}",
                                                              **(tags or {})}).info.run_id
    if trained_dir is not None:
        for file in ("weights.pt", "config.yaml"):
            client.log_artifact(parent, str(trained_dir / file), "best")
        client.set_tag(parent, "ich_tune.best_trial", trials[0]["id"])
    for trial in trials:
        child = client.create_run(experiment, run_name=f"run_trial_{trial['id']}", tags={
            TAG_PARENT: parent, TAG_TRIAL_ID: trial["id"],
            TAG_ENDED: "stopped early" if trial.get("stopped") else "finished" if trial.get(
                "status", "FINISHED") == "FINISHED" else "error"}).info.run_id
        for key, value in flatten(trial["params"]).items():
            client.log_param(child, key, value)
        steps = max(len(v) for v in trial["metrics"].values())
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, s + 1) for k, vs in trial["metrics"].items() for s, v in enumerate(vs)]
        client.log_batch(child, metrics=metrics + [Metric("step", steps, now, steps)])
        client.set_terminated(child, trial.get("status", "FINISHED"))
    if status != "RUNNING":
        client.set_terminated(parent, RunStatus.to_string(RunStatus.from_string(status)))
    return parent


TRIALS = [{"id": "a_00000", "params": {"optimizer": {"lr": 0.003}}, "metrics": {"val_accuracy": [0.5, 0.8]}},
          {"id": "a_00001", "params": {"optimizer": {"lr": 0.03}}, "metrics": {"val_accuracy": [0.4, 0.6]}}]


@pytest.fixture(scope="module")
def store(trained, tmp_path_factory) -> dict:
    """One SQLite store: search 'older' finished with weights, then a later running one without."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    finished = record_search(uri, "demo", trained[0], TRIALS)
    running = record_search(uri, "demo", None, TRIALS, status="RUNNING")
    return {"uri": uri, "finished": finished, "running": running}


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(t, b.state_dict()[k]) for k, t in a.state_dict().items())


def test_weights_file_and_train_folder_come_with_their_config(trained, tmp_path):
    folder, model = trained
    for spec in (folder / "weights.pt", folder):
        path, tree = resolve_weights(str(spec), None, tmp_path)
        assert path == folder / "weights.pt"
        assert tree == yaml.safe_load((folder / "config.yaml").read_text())
    loaded, config = load_trained(str(folder / "weights.pt"), None)
    assert same_weights(loaded, model) and not loaded.training
    assert config.model.hidden_dims == [8, 16] and config.data.size == 32
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_checkpoint_folder_and_file_find_the_config_one_folder_up(trained, tmp_path):
    folder, model = trained
    checkpoint = next(folder.glob("checkpoint_*"))  # the latest checkpoint a local run keeps
    for spec in (checkpoint, checkpoint / CHECKPOINT_FILE):
        path, tree = resolve_weights(str(spec), None, tmp_path)
        assert path == checkpoint / CHECKPOINT_FILE and tree["model"]["hidden_dims"] == [8, 16]
    loaded, _ = load_trained(str(checkpoint), None)
    assert same_weights(loaded, model)


def test_ray_trial_checkpoint_reads_the_trial_params(trained, tmp_path):
    folder, model = trained
    trial = tmp_path / "run_trial_x"
    (trial / "checkpoint_000001").mkdir(parents=True)
    shutil.copy(next(folder.glob("checkpoint_*")) / CHECKPOINT_FILE, trial / "checkpoint_000001")
    (trial / "params.json").write_text(json.dumps(yaml.safe_load((folder / "config.yaml").read_text())))
    loaded, config = load_trained(str(trial / "checkpoint_000001"), None)
    assert same_weights(loaded, model) and config.model.hidden_dims == [8, 16]


def test_weights_without_a_config_need_config_flag(trained, tmp_path):
    folder, model = trained
    shutil.copy(folder / "weights.pt", tmp_path / "alone.pt")
    assert resolve_weights(str(tmp_path / "alone.pt"), None, tmp_path)[1] is None
    with pytest.raises(UserError, match="--config"):
        load_trained(str(tmp_path / "alone.pt"), None)
    loaded, _ = load_trained(str(tmp_path / "alone.pt"), None, config_path=folder / "config.yaml")
    assert same_weights(loaded, model)


def test_run_id_and_runs_uri_download_the_best_weights(trained, store, tmp_path):
    folder, model = trained
    for spec in (store["finished"], f"runs:/{store['finished']}"):
        dest = tmp_path / spec.replace(":", "").replace("/", "_")
        path, tree = resolve_weights(spec, store["uri"], dest)
        assert path.name == "weights.pt" and path.is_relative_to(dest) and path.is_file()
        assert tree == yaml.safe_load((folder / "config.yaml").read_text())
        assert same_weights(load_trained(spec, store["uri"])[0], model)


def test_search_name_takes_the_latest_finished_search_with_weights(trained, store, tmp_path):
    path, tree = resolve_weights("search:demo", store["uri"], tmp_path)
    assert path.is_file() and tree["model"]["hidden_dims"] == [8, 16]
    assert same_weights(load_trained("search:demo", store["uri"])[0], trained[1])


@pytest.mark.parametrize("spec, message", [
    ("nowhere.pt", "'nowhere.pt': no such file or folder, and not an MLflow run id"),
    ("runs:/123", "not an MLflow run id"),
    ("0123456789abcdef0123456789abcdef", "MLflow run 0123456789abcdef0123456789abcdef not found"),
    ("search:nope", r"no search of that name .*\(known: demo\)"),
])
def test_bad_specs_say_what_was_tried(store, tmp_path, spec, message):
    with pytest.raises(UserError, match=message):
        resolve_weights(spec, store["uri"], tmp_path)


def test_a_trial_run_or_unfinished_search_points_elsewhere(store, tmp_path):
    client = MlflowClient(store["uri"])
    experiment = client.get_run(store["finished"]).info.experiment_id
    child = client.search_runs([experiment], f"tags.`{TAG_PARENT}` = '{store['finished']}'")[0]
    with pytest.raises(UserError, match=f"one trial of search run {store['finished']}"):
        resolve_weights(child.info.run_id, store["uri"], tmp_path)
    with pytest.raises(UserError, match="has no best/weights.pt"):
        resolve_weights(store["running"], store["uri"], tmp_path)


def test_missing_database_is_reported_not_created(tmp_path):
    database = tmp_path / "runs" / "mlflow.db"
    with pytest.raises(UserError, match="no MLflow database at .*--tracking-uri"):
        resolve_weights("search:demo", f"sqlite:///{database}", tmp_path)
    assert not database.exists()


def test_unusable_tracking_uri_is_one_user_error(tmp_path):
    with pytest.raises(UserError, match="MLflow: .*unsupported URI 'foo://bar'.*check --tracking-uri"):
        resolve_weights("search:demo", "foo://bar", tmp_path)


def test_folder_without_weights_is_refused(tmp_path):
    with pytest.raises(UserError, match="a folder without checkpoint.pt or weights.pt"):
        resolve_weights(str(tmp_path), None, tmp_path)
