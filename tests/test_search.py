"""Searches on a real local Ray cluster, recorded in a real MLflow SQLite store."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from ich_tune.tracking import child_runs
from tests.conftest import write_space as shared_write_space

ROOT = Path(__file__).resolve().parents[1]


def write_space(tmp_path: Path, tiny_rsna: Path, experiment: dict | None = None, **settings) -> Path:
    """By default two learning rates, recorded with TensorBoard and an example grid every 3 steps."""
    experiment = experiment or {"optimizer": {"lr": {"grid_search": [0.003, 0.0003]}},
                                "logging": {"tensorboard": True, "plot_interval": 3}}
    return shared_write_space(tmp_path, tiny_rsna, experiment=experiment, **settings)


@pytest.mark.slow
def test_search_records_every_trial_and_the_best_model(ray_cluster, tiny_rsna, tmp_path):
    import mlflow.pytorch
    import torch

    from ich_tune.config import load_search
    from ich_tune.search import RunOptions, run_search

    outcome = run_search(load_search(write_space(tmp_path, tiny_rsna)), RunOptions(name="r1"),
                         log=lambda *_: None)
    assert len(outcome.trials) == 2 and {t["status"] for t in outcome.trials} == {"finished"}
    assert outcome.best is not None and outcome.best["best"] == min(t["best"] for t in outcome.trials)

    client = MlflowClient(outcome.tracking_uri)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["optimizer.lr"] == str(outcome.best["params"]["optimizer.lr"])
    assert "best_val_log_loss" in parent.data.metrics
    artifacts = {a.path for a in client.list_artifacts(outcome.parent_run_id)}
    assert {"trials.csv", "best", "search"} <= artifacts
    best_files = {Path(a.path).name for a in client.list_artifacts(outcome.parent_run_id, "best")}
    assert best_files == {"weights.pt", "config.yaml", "examples.png", "roc.png", "curves.png"}
    children = child_runs(client, outcome.parent_run_id)
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_log_loss")]
        assert steps == sorted(set(steps)) and steps[0] == 3  # each validation once, at its step
        assert child.data.params["train.max_steps"] == "6"
        plots = client.list_artifacts(child.info.run_id, "plots")
        assert plots and plots[0].path == "plots/step_0000003"  # the example grid at each plot_interval

    model = mlflow.pytorch.load_model(f"runs:/{outcome.parent_run_id}/model")
    weights = torch.load(client.download_artifacts(outcome.parent_run_id, "best/weights.pt", str(tmp_path)),
                         weights_only=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights[name])
    events = list(outcome.run_dir.glob("*/tensorboard/events.out.tfevents.*"))
    assert len(events) == 2  # one TensorBoard log per trial


@pytest.mark.slow
def test_quarter_gpu_runs_four_trials_at_once(ray_cluster, tiny_rsna, tmp_path):
    from ich_tune.config import load_search
    from ich_tune.search import RunOptions, run_search

    space = write_space(tmp_path, tiny_rsna, resources={"cpu": 0.5, "gpu": 0.25},
                        scheduler={"name": "fifo"}, num_train_steps=30, val_interval=15,
                        experiment={"optimizer": {
                            "lr": {"grid_search": [0.001, 0.002, 0.003, 0.004]}}})
    outcome = run_search(load_search(space), RunOptions(name="gpu"), log=lambda *_: None)
    client = MlflowClient(outcome.tracking_uri)
    spans = [(c.info.start_time, c.info.end_time) for c in child_runs(client, outcome.parent_run_id)]
    assert len(spans) == 4
    latest_start = max(start for start, _ in spans)
    assert all(end > latest_start for _, end in spans)  # all four were running together


def run_cli(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1", "RAY_AUTH_MODE": "disabled"}
    return subprocess.Popen([sys.executable, "-m", "ich_tune", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


@pytest.mark.slow
def test_killed_search_resumes_without_duplicating_runs(tiny_rsna, tmp_path):
    space = write_space(tmp_path, tiny_rsna, scheduler={"name": "fifo"}, num_train_steps=60,
                        val_interval=10, experiment={"optimizer": {
                            "lr": {"grid_search": [0.001, 0.002, 0.003]}}})
    driver = run_cli("run", str(space), "--name", "k")
    run_dir = tmp_path / "runs" / "space" / "k"
    deadline = time.time() + 240
    while not list(run_dir.glob("*/checkpoint_*")) or not list(run_dir.glob("experiment_state*.json")):
        assert driver.poll() is None, driver.stdout.read()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.5)
    time.sleep(1.5)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("space")
    finished = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'")
    assert len(finished) < 3  # killed mid-search: the parent and some trials had not ended

    resumed = run_cli("run", str(space), "--name", "k", "--resume")
    output, _ = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, output
    assert output.count("finished") >= 3, output

    parents = client.search_runs([experiment.experiment_id], "tags.`ich_tune.search_dir` LIKE '%'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = child_runs(client, parents[0].info.run_id)
    assert len(children) == 3  # one per trial, none created twice
    assert {c.info.status for c in children} == {"FINISHED"}
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_log_loss")]
        assert steps == [10, 20, 30, 40, 50, 60]  # every validation once: none lost, none replayed


def test_bad_search_file_fails_before_ray_starts(tiny_rsna, tmp_path):
    space = write_space(tmp_path, tiny_rsna, search_alg={"name": "optuna"})
    driver = run_cli("run", str(space))
    output, _ = driver.communicate(timeout=60)
    assert driver.returncode == 2 and output.startswith("error: ") and "choice" in output
    assert "Traceback" not in output and "Ray" not in output


def test_missing_data_fails_with_the_fix(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"experiment": {"data": {"root": str(tmp_path / "nowhere")}},
                                     "num_train_steps": 5, "storage": str(tmp_path / "runs")}))
    driver = run_cli("run", str(space))
    output, _ = driver.communicate(timeout=60)
    assert driver.returncode == 2, output
    assert "nowhere: no stage_2_train.csv there" in output and "demo-data" in output


def test_init_from_a_search_is_fetched_to_a_local_file_before_trials_start(tiny_rsna, tmp_path):
    import torch

    from ich_tune.search import resolve_init_from
    from tests.test_weights import record_search, save_trained

    folder, model = save_trained(tiny_rsna, tmp_path / "halfres-run")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    record_search(uri, "halfres", folder, [{"id": "t0", "params": {}, "metrics": {"val_accuracy": [0.9]}}])
    tree = {"model": {"init_from": "search:halfres", "dropout": 0.1}, "data": {"lod": 0}}
    resolved = resolve_init_from(tree, uri, tmp_path / "init")
    weights = Path(resolved["model"]["init_from"])
    assert weights.is_absolute() and weights.is_file() and resolved["data"] == {"lod": 0}
    for name, tensor in torch.load(weights, weights_only=True).items():
        assert torch.equal(tensor, model.state_dict()[name])
    assert resolve_init_from({"model": {"dropout": 0.1}}, uri, tmp_path) == {"model": {"dropout": 0.1}}


def test_optuna_hears_of_asha_stopped_trials_as_pruned():
    from optuna.trial import TrialState
    from ray import tune

    from ich_tune.config.schema import SearchConfig
    from ich_tune.search import make_search_alg

    config = SearchConfig(metric="val_accuracy")
    config.search_alg.name = "optuna"
    searcher = make_search_alg(config, budget=100)
    searcher.set_search_properties("val_accuracy", "max", {"lr": tune.loguniform(1e-4, 1e-1)})
    for trial_id in ("stopped", "finished", "failed"):
        assert 1e-4 <= searcher.suggest(trial_id)["lr"] <= 1e-1
    searcher.on_trial_complete("stopped", {"step": 30, "val_accuracy": 0.7})
    searcher.on_trial_complete("finished", {"step": 100, "val_accuracy": 0.9})
    searcher.on_trial_complete("failed", None, error=True)
    states = [t.state for t in searcher._ot_study.trials]
    assert states == [TrialState.PRUNED, TrialState.COMPLETE, TrialState.FAIL]
    assert searcher._ot_study.best_value == 0.9
