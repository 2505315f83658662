"""What a search shows while it runs: the line per trial event off a terminal, the live table on one,
each trial's output in its own log file, and the libraries' lines in the driver's."""

import io
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient
from ray.tune.schedulers.async_hyperband import _Bracket
from rich.console import Console

from ich_tune.config.schema import SearchConfig
from ich_tune.search.console import LiveView, Plan, TrialState, duration, expected_steps, status_table
from ich_tune.search.driver_log import DriverLog, driver_log
from ich_tune.search.schedulers import rungs
from ich_tune.tracking.client import child_runs
from tests.conftest import ROOT, Cli
from tests.test_failures import wait_for, worker_pid
from tests.test_search import write_space

PLAN = Plan(metric="val_accuracy", mode="max", budget=400, dimensions=["optimizer.lr", "model.dropout"],
            total_trials=9, run_dir="/runs/demo/r", rungs=[50, 150], reduction_factor=3)


def fake_trial(trial_id: str, lr: float, dropout: float, status: str = "RUNNING", last_result=None,
               error: str | None = None) -> SimpleNamespace:
    """What the view reads of a Tune trial."""
    return SimpleNamespace(trial_id=trial_id, config={"optimizer": {"lr": lr}, "model": {"dropout": dropout}},
                           status=status, last_result=last_result or {},
                           path=f"/runs/demo/r/run_trial_{trial_id}_0_lr={lr}", pickled_error_file=None,
                           get_error=lambda: error)


def line_view() -> tuple[LiveView, io.StringIO]:
    out = io.StringIO()
    view = LiveView(PLAN, file=out, terminal=False)
    view.setup()
    return view, out


def test_off_a_terminal_each_trial_event_is_one_line():
    view, out = line_view()
    a, b = fake_trial("ab_00000", 0.002, 0.3), fake_trial("ab_00001", 0.008, 0.0)
    view.on_trial_start(0, [a, b], a)
    view.on_trial_start(0, [a, b], b)
    for step, accuracy in [(50, 0.9), (100, 0.93), (150, 0.95), (200, 0.96)]:
        view.on_trial_result(0, [a, b], a, {"step": step, "val_accuracy": accuracy})
    a.last_result = {"step": 400, "val_accuracy": 0.97}
    view.on_trial_result(0, [a, b], a, a.last_result)
    view.on_trial_complete(0, [a, b], a)
    b.last_result = {"step": 50, "val_accuracy": 0.55}
    view.on_trial_result(0, [a, b], b, b.last_result)
    view.on_trial_complete(0, [a, b], b)
    assert out.getvalue().splitlines() == [
        "trial ab_00000 started: lr=0.002 dropout=0.3",
        "trial ab_00001 started: lr=0.008 dropout=0",
        "trial ab_00000 passed rung 1 (step 50), val_accuracy 0.9000 there",
        "trial ab_00000 passed rung 2 (step 150), val_accuracy 0.9500 there",
        "trial ab_00000 finished: step 400/400, val_accuracy 0.9700, best 0.9700",
        "trial ab_00001 stopped at rung 1 (val_accuracy 0.5500, best 0.5500)",
    ]


def test_a_diverged_and_a_failed_trial_each_name_their_log_file():
    view, out = line_view()
    ended = {"ended": "diverged", "message": "step 2: the training loss is nan"}
    diverged = fake_trial("ab_00002", 1e30, 0.0, last_result={"step": 2, "val_accuracy": -1e308, **ended})
    crashed = fake_trial("ab_00003", 0.002, 0.0, status="ERROR",
                         error="RayActorError: The actor died unexpectedly\nmore lines")
    for trial in (diverged, crashed):
        view.on_trial_start(0, [diverged, crashed], trial)
    view.on_trial_result(0, [diverged, crashed], diverged, diverged.last_result)
    view.on_trial_complete(0, [diverged, crashed], diverged)
    view.on_trial_result(0, [diverged, crashed], crashed, {"step": 100, "val_accuracy": 0.9})
    view.on_trial_error(0, [diverged, crashed], crashed)
    assert out.getvalue().splitlines()[2:] == [
        "trial ab_00002 diverged: step 2: the training loss is nan "
        "(log: /runs/demo/r/run_trial_ab_00002_0_lr=1e+30/trial.log)",
        "trial ab_00003 failed at step 100: RayActorError: The actor died unexpectedly "
        "(log: /runs/demo/r/run_trial_ab_00003_0_lr=0.002/trial.log)",
    ]
    assert view.trials["ab_00002"].best is None  # the stand-in worst value is no measurement


def test_the_summary_line_comes_at_most_every_30_seconds(monkeypatch):
    view, out = line_view()
    a = fake_trial("ab_00000", 0.002, 0.3)
    view.on_trial_start(0, [a], a)
    clock = view.started
    monkeypatch.setattr("ich_tune.search.console.time.monotonic", lambda: clock)
    view.on_trial_result(0, [a], a, {"step": 50, "val_accuracy": 0.9})
    for now in (10, 29, 30, 45, 61):
        clock = view.started + now
        view.on_step_end(0, [a])
        assert len(out.getvalue().splitlines()) == 1 + (now >= 30) + (now >= 61)
    summaries = out.getvalue().splitlines()[1:]
    assert len(summaries) == 2
    # 50 steps in 30 s; still ahead: this trial's 100 to rung 2 and a third of its 250 after it, and the 8
    # others' 50 + 100 / 3 + 250 / 9 each: 1072 steps, 643 s
    assert summaries[0] == ("search: 1 running, 8 pending, 0 of 9 done | 30s elapsed, about 10m43s left | "
                            "best val_accuracy 0.9000 (ab_00000)")


def test_the_steps_a_trial_is_expected_to_train_under_asha():
    assert expected_steps(0, 400, [50, 150], 3) == pytest.approx(50 + 100 / 3 + 250 / 9)
    assert expected_steps(100, 400, [50, 150], 3) == pytest.approx(50 + 250 / 3)
    assert expected_steps(100, 400, [], 3) == 300  # no rungs: the whole budget


def test_rungs_are_where_rays_asha_puts_them():
    config = SearchConfig()
    for grace, factor, budget in [(50, 3, 400), (3, 2, 9), (3, 2, 6), (100, 4, 1600)]:
        config.scheduler.grace_period, config.scheduler.reduction_factor = grace, factor
        milestones = sorted(rung for rung, _ in _Bracket(grace, budget, factor, 0)._rungs)
        assert rungs(config, budget) == [m for m in milestones if m < budget]
    config.scheduler.name = "median"
    assert rungs(config, 400) == []


def test_durations():
    assert [duration(s) for s in (0, 45, 200, 3600 + 300)] == ["0s", "45s", "3m20s", "1h05m"]


def test_the_live_table_shows_the_searched_values_steps_metric_and_state():
    trials = [TrialState("ab_00000", {"lr": 0.002, "dropout": 0.3}, 400, 0.97, 0.975, "finished"),
              TrialState("ab_00001", {"lr": 0.008, "dropout": 0.0}, 120, 0.93, 0.94, "running"),
              TrialState("ab_00002", {"lr": 0.0005, "dropout": 0.15}, 50, 0.86, 0.87, "stopped at rung 1"),
              TrialState("ab_00003", {"lr": 0.0005, "dropout": 0.0}, 0, None, None, "pending")]
    console = Console(record=True, width=120)
    console.print(status_table(PLAN, trials, elapsed=80, eta=200))
    lines = [line.rstrip() for line in console.export_text().splitlines()]
    assert lines[0] == ("search: 1 running, 6 pending, 2 of 9 done | 1m20s elapsed, about 3m20s left | "
                        "best val_accuracy 0.9750 (ab_00000)")
    assert lines[1].split() == ["trial", "lr", "dropout", "step", "val_accuracy", "best", "state"]
    rows = [line.split(maxsplit=6) for line in lines[2:]]
    assert rows == [["ab_00001", "0.008", "0", "120/400", "0.9300", "0.9400", "running"],  # running first
                    ["ab_00003", "0.0005", "0", "0/400", "-", "-", "pending"],
                    ["ab_00000", "0.002", "0.3", "400/400", "0.9700", "0.9750", "finished"],
                    ["ab_00002", "0.0005", "0.15", "50/400", "0.8600", "0.8700", "stopped at rung 1"]]

    console = Console(record=True, width=120)
    console.print(status_table(PLAN, trials, elapsed=80, eta=None, max_rows=3))
    lines = console.export_text().splitlines()
    assert "about" not in lines[0] and lines[-1].strip() == "... 2 more"
    assert len(lines) == 5  # header, column names, 2 trials, the count of the rest


WORKER = """
import os, subprocess, sys
from pathlib import Path
from ich_tune.search.worker_output import output_to

log, echo = Path(sys.argv[1]), sys.argv[2] == "echo"
try:
    with output_to(log, echo=echo):
        print("a print")
        os.write(2, b"straight to stderr\\n")
        subprocess.run([sys.executable, "-c", "print('from a child')"], check=True)
        raise ValueError("boom")
except ValueError:
    print("after")
"""


@pytest.mark.parametrize("echo", ["", "echo"])
def test_a_workers_output_goes_to_its_file_child_processes_and_tracebacks_included(tmp_path, echo):
    """As in a Ray worker, whose stdout and stderr are files Ray forwards under --verbose (`echo`)."""
    log = tmp_path / "trial.log"
    ran = subprocess.run([sys.executable, "-c", WORKER, str(log), echo], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    text = log.read_text()
    if echo:  # copied on by one thread per stream: the two streams may interleave in the file
        assert all(part in text for part in ("a print", "straight to stderr", "from a child", "Traceback"))
    else:
        assert text.startswith("a print\nstraight to stderr\nfrom a child\nTraceback"), text
    assert text.rstrip().endswith("ValueError: boom")
    if echo:
        assert ran.stdout == "a print\nfrom a child\nafter\n"
        assert ran.stderr.startswith("straight to stderr\n")
        assert ran.stderr.rstrip().endswith("ValueError: boom")
    else:
        assert ran.stdout == "after\n" and ran.stderr == ""


def test_library_lines_are_held_until_the_run_folder_exists(tmp_path):
    ray_log = logging.getLogger("ray")
    handlers = ray_log.handlers[:]
    with DriverLog() as library_log:
        logging.getLogger("ray.tune").info("Tune says")
        logging.getLogger("mlflow.store").info("Creating initial MLflow database tables...")
        driver_log().info("progress bar")
        assert not (tmp_path / "run").exists()
        library_log.open(tmp_path / "run" / "driver.log")
        ray_log.warning("later")
    assert ray_log.handlers == handlers
    lines = (tmp_path / "run" / "driver.log").read_text().splitlines()
    assert [line.split(" ", 2)[2] for line in lines] == [
        "INFO ray.tune: Tune says", "INFO mlflow.store: Creating initial MLflow database tables...",
        "INFO ich_tune.driver_log: progress bar", "WARNING ray: later"]


def test_a_run_that_ends_before_its_folder_exists_shows_the_held_warnings(capsys):
    mlflow_log = logging.getLogger("mlflow")
    mlflow_log.addHandler(shown := logging.StreamHandler(sys.stderr))
    try:
        with DriverLog():
            mlflow_log.info("chatter")
            mlflow_log.warning("something to act on")
    finally:
        mlflow_log.removeHandler(shown)
    err = capsys.readouterr().err
    assert "something to act on" in err and "chatter" not in err


@pytest.mark.slow
def test_a_search_prints_a_few_lines_and_each_trial_keeps_its_output(tiny_rsna, tmp_path):
    """A search with its output sent to a file: one line per trial event, no worker lines, no Ray
    tables, no traceback; each trial's output in its trial.log, also in its MLflow run."""
    space = write_space(tmp_path, tiny_rsna, experiment={
        "optimizer": {"name": "sgd", "momentum": 0.0, "lr": {"grid_search": [0.05, 1e-7]}},
        "schedule": {"warmup_steps": 0}}, num_train_steps=9, max_concurrent_trials=1)
    with Cli("run", str(space), "--name", "quiet", log=tmp_path / "run.log") as cli:
        assert cli.wait(timeout=400) == 0, cli.output
    output = cli.output
    assert len(output.splitlines()) <= 80, output
    for noise in ("Traceback", "Exception ignored", "pid=", "Trial status", "Checkpoint successfully",
                  "INFO", "Configuration for experiment", "View detailed results"):
        assert noise not in output, noise
    assert re.search(r"^trial \w+_00000 started: lr=0.05$", output, re.M)
    assert re.search(r"^trial \w+_00000 finished: step 9/9, val_log_loss 0\.\d{4}, best 0\.\d{4}$", output,
                     re.M)
    assert re.search(r"^trial \w+_00001 stopped at rung 1 \(val_log_loss", output, re.M)
    run_dir = tmp_path / "runs" / "space" / "quiet"
    assert "Started a local Ray instance" in (run_dir / "driver.log").read_text()
    logs = sorted(run_dir.glob("run_trial_*/trial.log"))
    assert len(logs) == 2
    for log in logs:
        text = log.read_text()
        assert re.search(r"^step +3/9 +val accuracy", text, re.M) and "model: ResNetClassifier2d" in text
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    [parent] = client.search_runs([client.get_experiment_by_name("space").experiment_id],
                                  "tags.`ich_tune.search_dir` LIKE '%'")
    for child in child_runs(client, parent.info.run_id):
        assert "trial.log" in {a.path for a in client.list_artifacts(child.info.run_id)}


@pytest.mark.slow
def test_verbose_gives_rays_tables_and_every_workers_lines(tiny_rsna, tmp_path):
    space = write_space(tmp_path, tiny_rsna, scheduler={"name": "fifo"}, num_train_steps=3)
    with Cli("run", str(space), "--name", "loud", "--verbose", log=tmp_path / "run.log") as cli:
        assert cli.wait(timeout=400) == 0, cli.output
    output = cli.output
    assert "Trial status:" in output and "(run_trial pid=" in output
    assert re.search(r"\(run_trial pid=\d+\)\S* step +3/3 +val accuracy", output)  # \S*: Ray's colour codes
    [log] = (tmp_path / "runs" / "space" / "loud").glob("run_trial_*/trial.log")
    assert re.search(r"^step +3/3 +val accuracy", log.read_text(), re.M)  # kept all the same


@pytest.mark.slow
def test_a_diverged_and_a_crashed_trial_each_get_one_line_naming_their_log(tiny_rsna, tmp_path):
    """lr 1e30 diverges at once; the other trial's worker is SIGKILLed (as the OOM killer would) and
    max_failures 0 leaves it failed."""
    space = write_space(tmp_path, tiny_rsna, experiment={"optimizer": {"name": "sgd", "lr": {
        "grid_search": [1e30, 0.003]}}}, num_train_steps=1200, val_interval=100,
        scheduler={"name": "fifo"}, max_concurrent_trials=1, max_failures=0)
    run_dir = tmp_path / "runs" / "space" / "fail"
    with Cli("run", str(space), "--name", "fail", log=tmp_path / "run.log") as cli:
        trial = wait_for(lambda: sorted(run_dir.glob("run_trial_*_00001_*")), "the second trial", 240)[0]
        os.kill(wait_for(lambda: worker_pid(trial), "its worker", 240), signal.SIGKILL)
        assert cli.wait(timeout=300) == 1, cli.output
    output = cli.output
    diverged = [line for line in output.splitlines() if " diverged: " in line and line.startswith("trial ")]
    failed = [line for line in output.splitlines() if " failed at step " in line]
    assert len(diverged) == 1 and len(failed) == 1, output
    for line in diverged + failed:
        log = Path(re.search(r"\(log: (.+)\)$", line).group(1))
        assert log.name == "trial.log" and log.is_file(), line
    assert re.match(r"trial \w+_00000 diverged: step \d+: the training loss is (nan|inf)", diverged[0])
    assert re.match(r"trial \w+_00001 failed at step \d+: .*died", failed[0]), failed[0]
    assert "Traceback" not in output and "Exception ignored" not in output
