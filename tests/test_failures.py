"""Searches that survive their trials: divergence, a killed worker, a stopped driver, a second driver."""

import csv
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from ray.tune import ExperimentAnalysis

from ich_tune.errors import UserError
from ich_tune.tracking.client import child_runs
from ich_tune.tracking.report import search_report
from ich_tune.tracking.tags import TAG_ENDED, TAG_MESSAGE, TAG_RESTARTS, TAG_TRIAL_ID
from ich_tune.training.loop import OutOfMemory, is_out_of_memory, train
from tests.conftest import Cli, write_space


def runs_by_lr(client: MlflowClient, parent_run_id: str) -> dict[str, object]:
    return {run.data.params["optimizer.lr"]: run for run in child_runs(client, parent_run_id)}


def parent_of(client: MlflowClient, name: str):
    experiment = client.get_experiment_by_name(name)
    parents = client.search_runs([experiment.experiment_id], "tags.`ich_tune.search_dir` LIKE '%'")
    assert len(parents) == 1
    return parents[0]


@pytest.mark.slow
def test_a_diverging_trial_ends_alone_and_the_search_finishes(recorded_search):
    assert recorded_search.exit_status == 0, recorded_search.output
    rows = {line.split()[1]: line for line in recorded_search.output.splitlines()
            if re.match(r"\w+_0000\d\s", line)}  # the end-of-run table: trial, lr, steps, best, ended
    assert rows["0.05"].split()[2] == "9" and rows["0.05"].split()[-1] == "finished"  # after "vs best"
    assert rows["1e-07"].split()[2] == "3" and rows["1e-07"].endswith("stopped early")
    assert re.search(r"-\s+diverged: step \d+: the training loss is (nan|inf)\. Lower optimizer.lr",
                     rows["1e+30"])

    analysis = ExperimentAnalysis(str(recorded_search.run_dir))
    tune_trials = {t.config["optimizer"]["lr"]: t for t in analysis.trials}
    diverged = tune_trials[1e30]
    assert diverged.status == "TERMINATED" and diverged.num_failures == 0  # ended by itself, never retried
    assert diverged.last_result["ended"] == "diverged"
    assert diverged.last_result["val_log_loss"] == sys.float_info.max  # the worst value there is, finite
    assert tune_trials[0.05].last_result["step"] == 9 and "ended" not in tune_trials[0.05].last_result

    client = MlflowClient(recorded_search.tracking_uri)
    parent = parent_of(client, "space")
    assert parent.info.status == "FINISHED"
    children = runs_by_lr(client, parent.info.run_id)
    assert {lr: run.data.tags[TAG_ENDED] for lr, run in children.items()} == {
        "0.05": "finished", "1e-07": "stopped early", "1e+30": "diverged"}
    assert {lr: run.info.status for lr, run in children.items()} == {
        "0.05": "FINISHED", "1e-07": "FINISHED", "1e+30": "FAILED"}
    assert re.match(r"step \d+: the training loss is (nan|inf)", children["1e+30"].data.tags[TAG_MESSAGE])
    stand_in = client.get_metric_history(children["1e+30"].info.run_id, "val_log_loss")
    assert stand_in == []  # the worst value is for the schedulers, not a measurement to log
    assert parent.data.tags["ich_tune.best_trial"] == children["0.05"].data.tags[TAG_TRIAL_ID]
    assert parent.data.tags["mlflow.note.content"].startswith(
        f"Best: trial {children['0.05'].data.tags[TAG_TRIAL_ID]} (optimizer.lr=0.05), val_log_loss 0.")
    assert parent.data.tags["mlflow.note.content"].endswith(
        "3 trials (1 finished, 1 stopped early, 1 diverged).")
    assert {run.info.run_name for run in children.values()} == {"lr=0.05", "lr=1e-07", "lr=1e+30"}
    kind = client.get_experiment_by_name("space").tags["mlflow.experimentKind"]
    assert kind == "custom_model_development"  # MLflow's UI opens it on its training runs

    trials_csv = client.download_artifacts(parent.info.run_id, "trials.csv",
                                           str(recorded_search.run_dir.parent))
    with open(trials_csv, newline="") as f:
        ended = {row["optimizer.lr"]: row["ended"] for row in csv.DictReader(f)}
    assert ended == {"0.05": "finished", "1e-07": "stopped early", "1e+30": "diverged"}

    report = search_report("space", tracking_uri=recorded_search.tracking_uri)
    assert "stopped early" in report and re.search(r"diverged: step \d+: the training loss", report)


def wait_for(condition, what: str, timeout: float = 120):
    deadline = time.time() + timeout
    while not (value := condition()):
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def worker_pid(trial_dir: Path, other_than: int | None = None) -> int | None:
    """The live worker process of a trial, from the pid file it writes (a new one after a restart)."""
    pid_file = trial_dir / "worker.pid"
    if not pid_file.is_file() or not pid_file.read_text().strip():
        return None
    pid = int(pid_file.read_text())
    if pid == other_than:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid


@pytest.mark.slow
def test_a_killed_trial_worker_resumes_from_its_checkpoint(ray_cluster, tiny_rsna, tmp_path):
    """Trial A's worker is SIGKILLed once (as the OOM killer would): it restarts from its checkpoint and
    finishes. Trial B's is killed twice with max_failures 1: it ends in error; the search finishes."""
    from ich_tune.experiment import load_search
    from ich_tune.search.driver import run_search
    from ich_tune.search.options import RunOptions
    from ich_tune.trials import table

    lrs = {"optimizer": {"lr": {"grid_search": [0.003, 0.001]}}}
    space = write_space(tmp_path, tiny_rsna, experiment=lrs, num_train_steps=1200, val_interval=100,
                        scheduler={"name": "fifo"}, max_failures=1)
    search = load_search(space)
    outcome = {}
    driver = threading.Thread(target=lambda: outcome.update(
        result=run_search(search, RunOptions(name="k"))))
    driver.start()
    run_dir = tmp_path / "runs" / "space" / "k"
    trial_a, trial_b = wait_for(lambda: sorted(p for p in run_dir.glob("run_trial_*") if p.is_dir())[:2]
                                if len(list(run_dir.glob("run_trial_*"))) >= 2 else None, "two trials")
    for trial in (trial_a, trial_b):
        wait_for(lambda t=trial: list(t.glob("checkpoint_*")), f"a checkpoint of {trial.name}")
    # worker.pid reaches the run folder with Ray's next sync of the trial folder, not with the checkpoint
    first_a = wait_for(lambda: worker_pid(trial_a), "trial A's worker.pid")
    first_b = wait_for(lambda: worker_pid(trial_b), "trial B's worker.pid")
    os.kill(first_a, signal.SIGKILL)
    os.kill(first_b, signal.SIGKILL)
    second_b = wait_for(lambda: worker_pid(trial_b, other_than=first_b), "trial B's restart")
    os.kill(second_b, signal.SIGKILL)
    driver.join(timeout=300)
    assert not driver.is_alive()

    trials = {t.params["optimizer.lr"]: t for t in outcome["result"].trials}
    assert trials[0.003].status == "finished" and trials[0.003].steps == 1200
    assert trials[0.001].status == "error" and "\n" not in trials[0.001].message
    assert "died" in trials[0.001].message  # Ray's word for a worker killed from outside
    assert f"error: {trials[0.001].message}" in table(outcome["result"].trials, "val_log_loss", "min")

    client = MlflowClient(outcome["result"].tracking_uri)
    children = runs_by_lr(client, outcome["result"].parent_run_id)
    assert len(children) == 2  # one run per trial, restarts included
    steps = [m.step for m in client.get_metric_history(children["0.003"].info.run_id, "val_log_loss")]
    assert steps == list(range(100, 1201, 100))  # continued from the checkpoint: none repeated, none lost
    assert children["0.003"].data.tags[TAG_RESTARTS] == "1"
    assert children["0.003"].info.status == "FINISHED"
    assert children["0.001"].data.tags[TAG_ENDED] == "error" and children["0.001"].info.status == "FAILED"
    assert children["0.001"].data.tags[TAG_MESSAGE] == trials[0.001].message
    b_steps = [m.step for m in client.get_metric_history(children["0.001"].info.run_id, "val_log_loss")]
    assert b_steps == sorted(set(b_steps))


@pytest.mark.slow
def test_ctrl_c_marks_the_search_killed_and_resume_finishes_it(tiny_rsna, tmp_path):
    lrs = {"optimizer": {"lr": {"grid_search": [0.003, 0.001]}}}
    space = write_space(tmp_path, tiny_rsna, experiment=lrs, num_train_steps=600, val_interval=100,
                        scheduler={"name": "fifo"})
    run_dir = tmp_path / "runs" / "space" / "i"
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    with Cli("run", str(space), "--name", "i", log=tmp_path / "run.log") as driver:
        wait_for(lambda: list(run_dir.glob("*/checkpoint_*")) and list(run_dir.glob("experiment_state*")),
                 "a checkpoint", timeout=240)
        driver.signal(signal.SIGINT)
        assert driver.wait(timeout=120) == 130, driver.output
    output = driver.output
    assert "Traceback" not in output
    command = output.split("continue it with:\n", 1)[1].splitlines()[0].strip()
    assert command.endswith(f"run {space} --name i --resume")
    parent = parent_of(client, "space")
    assert parent.info.status == "KILLED"
    assert {c.info.status for c in child_runs(client, parent.info.run_id)} <= {"KILLED", "FINISHED"}

    with Cli(*command.split()[3:], log=tmp_path / "resume.log") as resumed:
        assert resumed.wait(timeout=400) == 0, resumed.output
    parent = parent_of(client, "space")
    assert parent.info.status == "FINISHED"
    children = child_runs(client, parent.info.run_id)
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_log_loss")]
        assert steps == [100, 200, 300, 400, 500, 600]


def test_a_second_driver_of_the_same_run_folder_is_refused(tmp_path):
    from ich_tune.search.run_folder import run_lock

    run_dir = tmp_path / "space" / "r"
    refusal = rf"{run_dir}: another `run` \(pid {os.getpid()}\) is writing"
    with run_lock(run_dir), pytest.raises(UserError, match=refusal), run_lock(run_dir):
        pass
    with run_lock(run_dir):  # free again once the first has ended
        pass


def test_out_of_memory_names_the_sizes_and_what_to_lower(tiny_config, tmp_path):
    from ich_tune.data.prepare import prepare_cache

    config = tiny_config(model={"hidden_dims": [2**50, 8]})  # a first layer no allocator can hold
    with pytest.raises(OutOfMemory) as caught:
        train(config, prepare_cache(config.data), tmp_path / "out")
    message = str(caught.value)
    assert message.startswith("out of memory: batch size 4, input 3x32x32, no GPU share set.")
    assert "Lower train.batch_size" in message and "resources.gpu" in message
    assert caught.value.status == "error"


def test_what_counts_as_out_of_memory():
    with pytest.raises(RuntimeError) as cpu:
        torch.empty(2**62, dtype=torch.uint8)  # the CPU allocator's own error
    assert is_out_of_memory(cpu.value)
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert not is_out_of_memory(RuntimeError("shapes cannot be multiplied"))
