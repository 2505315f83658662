"""Searches on a real local Ray cluster, recorded in a real MLflow SQLite store."""

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from ich_tune.tracking.client import child_runs
from ich_tune.tracking.tags import TAG_ENDED, TAG_RESTARTS, TAG_TRIAL_ID, TAG_VERSUS_BEST
from tests.conftest import Cli, free_port, shared_cache
from tests.conftest import write_space as shared_write_space
from tests.test_failures import wait_for, worker_pid


def write_space(folder: Path, tiny_rsna: Path, experiment: dict | None = None, **settings) -> Path:
    """A search file over the tiny dataset that reuses the session's preprocessed cache."""
    experiment = {**(experiment or {}), "data": {"cache_dir": str(shared_cache(tiny_rsna))}}
    return shared_write_space(folder, tiny_rsna, experiment=experiment, **settings)


def results(trial_dir: Path) -> list[dict]:
    """Every result Ray recorded for a trial, restarts included, in order."""
    return [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]


def in_thread(search, options):
    """run_search on a driver thread, so the test can act on the trials while they run."""
    from ich_tune.search.driver import run_search

    outcome: dict = {}

    def drive() -> None:
        try:
            outcome["result"] = run_search(search, options)
        except BaseException as err:  # the test reports it
            outcome["error"] = err

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    return driver, outcome


@pytest.fixture(scope="module")
def optuna_search(ray_cluster, tiny_rsna, tmp_path_factory):
    """An Optuna (TPE) search over a `choice` and a `loguniform` dimension with ASHA, two trials one
    after the other: seeded, the first draws lr 0.05 and the second lr 1e-6, which is worse at the
    first rung (step 3), so ASHA stops it there. TensorBoard and an example grid every 3 steps."""
    from ich_tune.experiment import load_search
    from ich_tune.search.driver import run_search
    from ich_tune.search.options import RunOptions

    folder = tmp_path_factory.mktemp("optuna")
    space = write_space(folder, tiny_rsna, experiment={
        "optimizer": {"name": "sgd", "momentum": 0.0, "lr": {"choice": [0.05, 1e-6]}},
        "model": {"dropout": {"loguniform": {"lower": 0.01, "upper": 0.3}}},
        "schedule": {"warmup_steps": 0}, "logging": {"tensorboard": True, "plot_interval": 3}},
        search_alg={"name": "optuna", "seed": 0}, num_samples=2, max_concurrent_trials=1)
    return run_search(load_search(space), RunOptions(name="o"))


@pytest.mark.slow
def test_search_records_every_trial_and_the_best_model(optuna_search, tmp_path):
    import mlflow.pyfunc
    import numpy as np
    import torch

    from ich_tune.tracking.references import load_model, load_trained
    from ich_tune.training.loop import CHECKPOINT_FILE

    outcome = optuna_search
    assert sorted(t.status for t in outcome.trials) == ["finished", "stopped early"]
    finished = next(t for t in outcome.trials if t.status == "finished")
    assert outcome.best is finished
    with finished.checkpoint.as_directory() as folder:  # a Ray Checkpoint, wherever storage is
        assert (Path(folder) / CHECKPOINT_FILE).is_file()

    client = MlflowClient(outcome.tracking_uri)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert float(parent.data.params["optimizer.lr"]) == finished.params["optimizer.lr"]
    assert "best_val_log_loss" in parent.data.metrics
    artifacts = {a.path for a in client.list_artifacts(outcome.parent_run_id)}
    assert {"trials.csv", "best", "search"} <= artifacts
    best_files = {Path(a.path).name for a in client.list_artifacts(outcome.parent_run_id, "best")}
    assert best_files == {"weights.pt", "config.yaml", "report.html", "examples.png", "roc.png",
                          "reliability.png", "curves.png"}
    children = {c.data.tags[TAG_TRIAL_ID]: c for c in child_runs(client, outcome.parent_run_id)}
    assert children.keys() == {t.trial_id for t in outcome.trials}
    metrics = parent.data.metrics
    low, high = metrics["best_val_auc_any_ci_low"], metrics["best_val_auc_any_ci_high"]
    assert low <= metrics["best_val_auc_any"] <= high
    other = next(t for t in outcome.trials if t is not finished)
    assert other.versus_best in ("tied", "worse", "better")
    assert children[other.trial_id].data.tags[TAG_VERSUS_BEST] == other.versus_best
    assert load_model(outcome.parent_run_id, outcome.tracking_uri).calibration is not None
    for trial in outcome.trials:
        child = children[trial.trial_id]
        assert child.info.status == "FINISHED" and child.data.tags[TAG_ENDED] == trial.status
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_log_loss")]
        assert steps == ([3, 6] if trial.status == "finished" else [3])  # each validation once, at its step
        assert child.data.params["train.max_steps"] == "6"
        plots = client.list_artifacts(child.info.run_id, "plots")
        assert plots and plots[0].path == "plots/step_0000003"  # the example grid at each plot_interval

    model = mlflow.pyfunc.load_model(f"runs:/{outcome.parent_run_id}/model")
    best, _ = load_trained(outcome.parent_run_id, outcome.tracking_uri)
    batch = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = torch.sigmoid(best(batch)).numpy()
    np.testing.assert_allclose(model.predict(batch.numpy()).to_numpy(), expected, rtol=1e-6)
    logged = {p.parent.parent for p in Path(outcome.run_dir).glob("*/tensorboard/events.out.tfevents.*")}
    assert len(logged) == 2  # a TensorBoard log in each trial's folder


@pytest.mark.slow
def test_optuna_hears_of_the_trial_asha_stopped_as_pruned(optuna_search):
    """The study Ray saved with the search (what a --resume continues from) has the trial ASHA stopped
    at its first rung as PRUNED, and the finished one COMPLETE with its last value."""
    from optuna.trial import TrialState
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch()
    searcher.restore_from_dir(str(optuna_search.run_dir))
    trials = {t.trial_id: t for t in optuna_search.trials}
    assert searcher._ot_trials.keys() == trials.keys()
    for trial_id, trial in trials.items():
        seen = searcher._ot_study.trials[searcher._ot_trials[trial_id].number]
        assert seen.params == {"optimizer/lr": trial.params["optimizer.lr"],
                               "model/dropout": trial.params["model.dropout"]}
        if trial.status == "stopped early":
            assert trial.params["optimizer.lr"] == 1e-6 and trial.steps == 3
            assert seen.state == TrialState.PRUNED
        else:
            assert seen.state == TrialState.COMPLETE
            assert seen.value == trial.history[-1]["val_log_loss"]


@pytest.mark.slow
def test_quarter_gpu_holds_four_trials_at_once(ray_cluster, tiny_rsna, tmp_path):
    """Each trial's worker is stopped (SIGSTOP) as soon as its pid file appears, so it keeps its GPU
    share: a fourth can only start while three others hold theirs. Then they all go on and finish.

    The pid file reaches the run folder with the trial's first checkpoint (Ray copies it from its
    staging folder), so the trials are long enough to still be running then."""
    import ray

    from ich_tune.experiment import load_search
    from ich_tune.search.options import RunOptions

    space = write_space(tmp_path, tiny_rsna, resources={"cpu": 0.5, "gpu": 0.25},
                        scheduler={"name": "fifo"}, num_train_steps=200, val_interval=20,
                        experiment={"optimizer": {"lr": {"grid_search": [0.001, 0.002, 0.003, 0.004]}}})
    run_dir = tmp_path / "runs" / "space" / "gpu"
    driver, outcome = in_thread(load_search(space), RunOptions(name="gpu"))
    stopped: dict[Path, int] = {}
    try:
        deadline = time.time() + 120
        while len(stopped) < 4:
            assert time.time() < deadline, f"only {len(stopped)} trials held a GPU share at once"
            assert driver.is_alive(), outcome
            for pid_file in run_dir.glob("run_trial_*/worker.pid"):
                text = pid_file.read_text().strip()
                if pid_file.parent not in stopped and text:
                    os.kill(int(text), signal.SIGSTOP)  # fails if it has ended already
                    stopped[pid_file.parent] = int(text)
            time.sleep(0.05)
        for pid in stopped.values():  # each one stopped, none finished
            assert Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "T"
        assert len(set(stopped.values())) == 4
        assert ray.cluster_resources()["GPU"] == 1
        wait_for(lambda: ray.available_resources().get("GPU", 0) == 0, "the four shares to be taken", 10)
        held = [group["bundles"] for group in ray.util.placement_group_table().values()
                if group["state"] == "CREATED"]
        assert held == [{0: {"CPU": 0.5, "GPU": 0.25}}] * 4  # what each trial asked for
    finally:
        for pid in stopped.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        driver.join(timeout=300)
    assert not driver.is_alive() and "error" not in outcome
    assert [t.status for t in outcome["result"].trials] == ["finished"] * 4


@pytest.mark.slow
def test_randomize_seed_gives_each_trial_its_own_seed_kept_across_a_retry(ray_cluster, tiny_rsna, tmp_path):
    """Trial A's worker is SIGKILLed after its first checkpoint; Ray restarts it from there. The seed it
    reports is the same before and after the restart, and differs from trial B's."""
    from ich_tune.experiment import load_search
    from ich_tune.search.options import RunOptions

    space = write_space(tmp_path, tiny_rsna, scheduler={"name": "fifo"}, num_train_steps=300,
                        val_interval=30, randomize_seed=True,
                        experiment={"optimizer": {"lr": {"grid_search": [0.003, 0.001]}}})
    run_dir = tmp_path / "runs" / "space" / "seed"
    driver, outcome = in_thread(load_search(space), RunOptions(name="seed"))
    try:
        trial_a = wait_for(lambda: sorted(run_dir.glob("run_trial_*_00000_*")), "trial A")[0]
        result = trial_a / "result.json"  # a line once Ray has taken in a result and its checkpoint
        wait_for(lambda: result.is_file() and "\n" in result.read_text(), "trial A's first checkpoint")
        first = wait_for(lambda: worker_pid(trial_a), "trial A's running worker")
        os.kill(first, signal.SIGKILL)
    finally:
        driver.join(timeout=300)
    assert not driver.is_alive() and "error" not in outcome
    trial_b = next(run_dir.glob("run_trial_*_00001_*"))
    second = int((trial_a / "worker.pid").read_text())  # the worker of the restart

    rows = results(trial_a)
    seeds_a = {pid: {r["seed"] for r in rows if r["pid"] == pid} for pid in (first, second)}
    assert first != second and {r["pid"] for r in rows} == {first, second}
    restart = min(r["step"] for r in rows if r["pid"] == second)
    assert restart > min(r["step"] for r in rows if r["pid"] == first)  # from its checkpoint, not step 0
    assert len(seeds_a[first]) == 1 and seeds_a[second] == seeds_a[first], seeds_a  # one seed, kept
    [seed_a] = seeds_a[first]
    [seed_b] = {row["seed"] for row in results(trial_b)}
    assert seed_a != seed_b and 7 not in (seed_a, seed_b)  # not the experiment's seed either
    assert {t.trial_id: t.seed for t in outcome["result"].trials} == {
        results(trial_a)[-1]["trial_id"]: seed_a, results(trial_b)[-1]["trial_id"]: seed_b}

    client = MlflowClient(outcome["result"].tracking_uri)
    for child in child_runs(client, outcome["result"].parent_run_id):
        logged = {m.value for m in client.get_metric_history(child.info.run_id, "seed")}
        restarted = child.data.tags.get(TAG_RESTARTS)
        assert logged == ({seed_a} if restarted == "1" else {seed_b})


@pytest.mark.slow
def test_killed_search_resumes_without_duplicating_runs(tiny_rsna, tmp_path):
    """The driver, its Ray and its trials are SIGKILLed once checkpoints exist; --resume finishes it."""
    space = write_space(tmp_path, tiny_rsna, scheduler={"name": "fifo"}, num_train_steps=30,
                        val_interval=10, experiment={"optimizer": {
                            "lr": {"grid_search": [0.001, 0.002, 0.003]}}})
    run_dir = tmp_path / "runs" / "space" / "k"
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    with Cli("run", str(space), "--name", "k", log=tmp_path / "run.log") as driver:
        def checkpointed() -> bool:
            assert driver.process.poll() is None, driver.output
            return bool(list(run_dir.glob("*/checkpoint_*")) and list(run_dir.glob("experiment_state*.json")))

        wait_for(checkpointed, "a checkpoint", timeout=240)
        time.sleep(1.5)  # the search's state is saved every second (TUNE_GLOBAL_CHECKPOINT_S)
    assert driver.process.returncode == -signal.SIGKILL, driver.output
    experiment = client.get_experiment_by_name("space")
    [parent] = client.search_runs([experiment.experiment_id], "tags.`ich_tune.search_dir` LIKE '%'")
    assert parent.info.status == "RUNNING"  # killed: nothing ended it

    with Cli("run", str(space), "--name", "k", "--resume", log=tmp_path / "resume.log") as resumed:
        assert resumed.wait(timeout=400) == 0, resumed.output

    parents = client.search_runs([experiment.experiment_id], "tags.`ich_tune.search_dir` LIKE '%'")
    assert [p.info.run_id for p in parents] == [parent.info.run_id]
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    children = child_runs(client, parent.info.run_id)
    assert len(children) == 3  # one per trial, none created twice
    assert {c.info.status for c in children} == {"FINISHED"}
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_log_loss")]
        assert steps == [10, 20, 30]  # every validation once: none lost, none replayed


def refusal(tmp_path: Path, *args: str) -> str:
    """`ich_tune run ...` that must stop at once: exit status 2, one `error:` line, no traceback."""
    with Cli("run", *args, log=tmp_path / "refused.log") as cli:
        assert cli.wait(timeout=120) == 2, cli.output
    output = cli.output
    assert output.startswith("error: ") and output.count("\n") == 1, output
    assert "Traceback" not in output and "Ray" not in output  # refused before Ray started
    return output


def test_bad_search_file_fails_before_ray_starts(tiny_rsna, tmp_path):
    space = write_space(tmp_path, tiny_rsna, search_alg={"name": "optuna"},
                        experiment={"optimizer": {"lr": {"grid_search": [0.003, 0.0003]}}})  # not for Optuna
    assert "choice" in refusal(tmp_path, str(space))


def test_missing_data_fails_with_the_fix(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"experiment": {"data": {"root": str(tmp_path / "nowhere")}},
                                     "num_train_steps": 5, "storage": str(tmp_path / "runs")}))
    output = refusal(tmp_path, str(space))
    assert "nowhere: no stage_2_train.csv there" in output and "demo-data" in output


def test_resume_with_nothing_to_resume_is_refused(tiny_rsna, tmp_path):
    space = write_space(tmp_path, tiny_rsna)
    search_dir = tmp_path / "runs" / "space"
    assert f"--resume: no search to resume under {search_dir}/" in refusal(tmp_path, str(space), "--resume")
    output = refusal(tmp_path, str(space), "--resume", "--name", "never")
    assert f"--resume: {search_dir / 'never'} holds no search state to resume" in output


def test_a_run_folder_that_exists_is_refused(tiny_rsna, tmp_path):
    space = write_space(tmp_path, tiny_rsna)
    taken = tmp_path / "runs" / "space" / "taken"
    taken.mkdir(parents=True)
    (taken / "kept.txt").write_text("not overwritten")
    output = refusal(tmp_path, str(space), "--name", "taken")
    assert f"{taken} exists already: add --resume to continue it, or pick another --name" in output
    assert [p.name for p in taken.iterdir()] == ["kept.txt"]


def test_init_from_a_search_is_fetched_to_a_local_file_before_trials_start(recorded_search, tmp_path):
    from ich_tune.search.driver import resolve_init_from
    from ich_tune.tracking.references import load_trained

    tree = {"model": {"init_from": "search:space", "dropout": 0.1}, "data": {"lod": 0}}
    resolved = resolve_init_from(tree, recorded_search.tracking_uri, tmp_path / "init")
    weights = Path(resolved["model"]["init_from"])
    assert weights.is_absolute() and weights.is_relative_to(tmp_path / "init") and weights.is_file()
    assert resolved["data"] == {"lod": 0} and resolved["model"]["dropout"] == 0.1
    fetched, _ = load_trained(str(weights), None)
    best, _ = load_trained("search:space", recorded_search.tracking_uri)
    assert fetched.state_dict().keys() == best.state_dict().keys()
    assert all(t.equal(best.state_dict()[k]) for k, t in fetched.state_dict().items())
    assert resolve_init_from({"model": {"dropout": 0.1}}, recorded_search.tracking_uri, tmp_path) == {
        "model": {"dropout": 0.1}}


def test_optuna_searcher_tells_pruned_completed_and_failed_apart():
    from optuna.trial import TrialState
    from ray import tune

    from ich_tune.config.schema import SearchConfig
    from ich_tune.experiment import Search
    from ich_tune.search.search_algs import make_search_alg

    config = SearchConfig(metric="val_accuracy")
    config.search_alg.name = "optuna"
    searcher = make_search_alg(Search(Path("space.yaml"), config, {}, {}, []), budget=100)
    searcher.set_search_properties("val_accuracy", "max", {"lr": tune.loguniform(1e-4, 1e-1)})
    for trial_id in ("stopped", "finished", "failed", "diverged"):
        assert 1e-4 <= searcher.suggest(trial_id)["lr"] <= 1e-1
    searcher.on_trial_complete("stopped", {"step": 30, "val_accuracy": 0.7})
    searcher.on_trial_complete("finished", {"step": 100, "val_accuracy": 0.9})
    searcher.on_trial_complete("failed", None, error=True)
    searcher.on_trial_complete("diverged", {"step": 100, "val_accuracy": -1e308, "ended": "diverged"})
    states = [t.state for t in searcher._ot_study.trials]
    assert states == [TrialState.PRUNED, TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED]
    assert searcher._ot_study.best_value == 0.9


@pytest.mark.slow
def test_tensorboard_serves_each_trials_hparams_and_metrics(optuna_search, tmp_path):
    """`tensorboard --logdir <run>` as README prints it starts, on loopback, and its HParams dashboard
    lists both trials with their searched values and the validation metrics as columns."""
    import subprocess
    import sys
    import urllib.request

    port = free_port()
    url = f"http://127.0.0.1:{port}/data/plugin/hparams"
    with open(tmp_path / "tensorboard.log", "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir",
                                   str(optuna_search.run_dir), "--host", "127.0.0.1", "--port", str(port)],
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        def post(route: str, body: dict) -> dict:
            request = urllib.request.Request(f"{url}/{route}", json.dumps(body).encode(),
                                             {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.load(response)

        experiment = wait_for(lambda: _answer(post, "experiment", {"experimentName": ""}), "TensorBoard",
                              timeout=90)
        hparams = {h["name"] for h in experiment["hparamInfos"]}
        assert {"optimizer.lr", "model.dropout"} <= hparams
        metrics = {m["name"]["tag"] for m in experiment["metricInfos"]}
        assert {"val/accuracy", "val/log_loss"} <= metrics
        groups = post("session_groups", {"experimentName": "", "startIndex": 0, "sliceSize": 10,
                                         "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS",
                                                             "STATUS_FAILURE", "STATUS_RUNNING"],
                                         "colParams": []})
        lrs = sorted(g["hparams"]["optimizer.lr"] for g in groups["sessionGroups"])
        assert lrs == sorted(t.params["optimizer.lr"] for t in optuna_search.trials)
    finally:
        server.terminate()
        server.wait(timeout=30)


def _answer(post, route: str, body: dict) -> dict | None:
    """The route's answer once the server is up and has read the logs, else None."""
    try:
        answer = post(route, body)
    except OSError:
        return None
    return answer if answer.get("hparamInfos") else None
