"""Every form of --model resolves to real trained weights and their config; bad ones say what was tried.

The weights come from real runs: `ich_tune train --out`, and searches recorded in MLflow by the real
tracking callback (the session's recorded search, and the four runs of search 'halfres').
"""

import contextlib
import io
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from ray.tune import ExperimentAnalysis

from ich_tune.cli import main
from ich_tune.errors import UserError
from ich_tune.tracking.references import load_trained, resolve_weights
from ich_tune.tracking.tags import TAG_PARENT, TAG_SEARCH_DIR
from tests.conftest import shared_cache, tiny_tree


def save_trained(root: Path, folder: Path) -> tuple[Path, torch.nn.Module]:
    """What `ich_tune train EXPERIMENT --out folder` leaves (weights.pt, config.yaml, its checkpoints),
    and the model it trained. The cache is shared, so the modules that train build it once."""
    folder.mkdir(parents=True, exist_ok=True)
    experiment = folder / "experiment.yaml"
    experiment.write_text(yaml.safe_dump(tiny_tree(root, shared_cache(root))))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["train", str(experiment), "--out", str(folder)]) == 0
    return folder, load_trained(str(folder / "weights.pt"), None)[0]


@pytest.fixture(scope="module")
def trained(tiny_rsna, tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    return save_trained(tiny_rsna, tmp_path_factory.mktemp("trained") / "out")


@pytest.fixture(scope="module")
def recorded(recorded_search) -> dict:
    """The recorded search's parent run, and the best checkpoint of its best trial as Ray kept it."""
    client = MlflowClient(recorded_search.tracking_uri)
    experiment = client.get_experiment_by_name("space").experiment_id
    [parent] = client.search_runs([experiment], f"tags.`{TAG_SEARCH_DIR}` LIKE '%'")
    analysis = ExperimentAnalysis(str(recorded_search.run_dir))
    [best] = [t for t in analysis.trials if t.trial_id == parent.data.tags["ich_tune.best_trial"]]
    checkpoint = analysis.get_best_checkpoint(best, "val_log_loss", "min")
    return {"uri": recorded_search.tracking_uri, "parent": parent.info.run_id, "trial": best,
            "checkpoint": Path(checkpoint.path)}


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return a.state_dict().keys() == b.state_dict().keys() and all(
        torch.equal(t, b.state_dict()[k]) for k, t in a.state_dict().items())


def test_weights_file_and_train_folder_come_with_their_config(trained, tmp_path):
    folder, model = trained
    for spec in (folder / "weights.pt", folder):
        path, tree = resolve_weights(str(spec), None, tmp_path)
        assert path == folder / "weights.pt"
        assert tree == yaml.safe_load((folder / "config.yaml").read_text())
    loaded, config = load_trained(str(folder), None)
    assert same_weights(loaded, model) and not loaded.training
    assert config.model.hidden_dims == [8, 16] and config.data.size == 32
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_checkpoint_folder_and_file_find_the_config_one_folder_up(trained, tmp_path):
    folder, model = trained
    checkpoint = sorted(folder.glob("checkpoint_*"))[-1]  # the last one: the weights train saved
    for spec in (checkpoint, checkpoint / "checkpoint.pt"):
        path, tree = resolve_weights(str(spec), None, tmp_path)
        assert path == checkpoint / "checkpoint.pt" and tree["model"]["hidden_dims"] == [8, 16]
    loaded, _ = load_trained(str(checkpoint), None)
    assert same_weights(loaded, model)


def test_a_ray_trial_checkpoint_loads_with_the_trials_config(recorded):
    loaded, config = load_trained(str(recorded["checkpoint"]), None)
    assert config.optimizer.lr == recorded["trial"].config["optimizer"]["lr"]
    assert same_weights(loaded, load_trained(str(recorded["checkpoint"] / "checkpoint.pt"), None)[0])


def test_weights_without_a_config_need_config_flag(trained, tmp_path):
    folder, model = trained
    torch.save(model.state_dict(), tmp_path / "alone.pt")  # a bare state dict, as older versions saved
    assert resolve_weights(str(tmp_path / "alone.pt"), None, tmp_path)[1] is None
    with pytest.raises(UserError, match="--config"):
        load_trained(str(tmp_path / "alone.pt"), None)
    loaded, _ = load_trained(str(tmp_path / "alone.pt"), None, config_path=folder / "config.yaml")
    assert same_weights(loaded, model)


def test_run_id_and_runs_uri_download_the_best_checkpoints_weights(recorded, tmp_path):
    best, _ = load_trained(str(recorded["checkpoint"]), None)
    for spec in (recorded["parent"], f"runs:/{recorded['parent']}", f"runs:/{recorded['parent']}/"):
        dest = tmp_path / str(len(spec))
        path, tree = resolve_weights(spec, recorded["uri"], dest)
        assert path.name == "weights.pt" and path.is_relative_to(dest) and path.is_file()
        assert tree == recorded["trial"].config  # best/config.yaml: the best trial's whole config
        assert same_weights(load_trained(spec, recorded["uri"])[0], best)


def test_search_name_takes_the_latest_finished_search_with_weights(search_history, tmp_path):
    """Four runs of 'halfres', oldest first: finished (lr 0.003), finished (lr 0.01), failed without
    weights, finished (lr 0.03) with its weights since deleted. The second is the one to pick."""
    client = MlflowClient(search_history.tracking_uri)
    run_of_lr = {float(client.get_run(run_id).data.params["optimizer.lr"]): run_id
                 for run_id in (search_history.older, search_history.newer, search_history.weights_removed)}
    path, tree = resolve_weights("search:halfres", search_history.tracking_uri, tmp_path / "search")
    assert run_of_lr[tree["optimizer"]["lr"]] == search_history.newer
    newer, _ = resolve_weights(search_history.newer, search_history.tracking_uri, tmp_path / "newer")
    assert resolve_weights(search_history.older, search_history.tracking_uri, tmp_path / "older")[0].is_file()
    model, _ = load_trained("search:halfres", search_history.tracking_uri)
    assert same_weights(model, load_trained(str(newer), None)[0])
    assert client.get_run(search_history.weights_removed).info.status == "FINISHED"
    assert client.get_run(search_history.failed).info.status == "FAILED"


@pytest.mark.parametrize("spec, message", [
    ("nowhere.pt", "'nowhere.pt': no such file or folder, and not an MLflow run id"),
    ("runs:/123", "not an MLflow run id"),
    ("0123456789abcdef0123456789abcdef", "MLflow run 0123456789abcdef0123456789abcdef not found"),
    ("search:nope", r"no search of that name .*\(known: halfres, space\)"),
])
def test_bad_specs_say_what_was_tried(search_history, tmp_path, spec, message):
    with pytest.raises(UserError, match=message):
        resolve_weights(spec, search_history.tracking_uri, tmp_path)


def test_a_trial_run_or_a_search_without_weights_points_elsewhere(recorded, search_history, tmp_path):
    client = MlflowClient(recorded["uri"])
    experiment = client.get_run(recorded["parent"]).info.experiment_id
    child = client.search_runs([experiment], f"tags.`{TAG_PARENT}` = '{recorded['parent']}'")[0]
    with pytest.raises(UserError, match=f"one trial of search run {recorded['parent']}"):
        resolve_weights(child.info.run_id, recorded["uri"], tmp_path)
    for run_id in (search_history.failed, search_history.weights_removed):
        with pytest.raises(UserError, match="has no best/weights.pt artifact; only a search's parent run"):
            resolve_weights(run_id, search_history.tracking_uri, tmp_path)


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
