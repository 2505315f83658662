"""Benchmarks are measured by running them (python -m ich_tune bench ...), not here: these tests run
them small, and check that one which cannot run says why, and that figures and verdicts agree with
what was run."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: packing would run")
def test_bench_packing_without_a_gpu_says_so():
    result = subprocess.run([sys.executable, "-m", "ich_tune", "bench", "packing"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "needs a CUDA GPU" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_bench_search_runs_each_variant_as_a_real_search(tiny_rsna, tmp_path):
    """The grid, and ASHA over the grid in a shuffled order, on a 4-trial space: the shuffled variant
    runs every grid point once per sample, every figure adds up, the plot reaches disk and MLflow."""
    import json

    from mlflow.tracking import MlflowClient

    from tests.conftest import Cli, write_space

    space = write_space(tmp_path, tiny_rsna, experiment={"optimizer": {"lr": {"grid_search": [0.003, 1e-6]}}},
                        num_samples=2, metric="val_accuracy", mode="max")
    figures_file = tmp_path / "figures.json"
    with Cli("bench", "search", "--space", str(space), "--storage", str(tmp_path / "bench"),
             "--variants", "asha-shuffled", "--json", str(figures_file), log=tmp_path / "log") as cli:
        assert cli.wait(600) == 0, cli.output[-3000:]
    # the bench's own lines: a Ray worker may print Python's "Exception ignored" noise as it exits
    own = [line for line in cli.output.splitlines() if "pid=" not in line]
    assert not [line for line in own if "Traceback" in line], cli.output[-3000:]
    figures = json.loads(figures_file.read_text())
    grid, shuffled = figures["variants"]["grid"], figures["variants"]["asha-shuffled"]
    assert grid["trials"] == shuffled["trials"] == 4
    assert grid["steps"] == 4 * 6 and grid["steps_ratio"] == 1 and grid["stopped_early"] == 0
    points = sorted(json.dumps(p, sort_keys=True) for p in grid["trial_params"])
    assert sorted(json.dumps(p, sort_keys=True) for p in shuffled["trial_params"]) == points
    for f in (grid, shuffled):
        assert f["steps"] <= grid["steps"] and f["steps_ratio"] == f["steps"] / grid["steps"]
        assert f["gap"] == abs(f["best"] - grid["best"])
        assert f["efficiency"] > 0 and f["busy_s"] <= f["concurrency"] * f["wall_s"] * 1.05
        assert f["curve"]["steps"] == sorted(f["curve"]["steps"]) and f["curve"]["steps"][-1] == f["steps"]
        assert max(f["curve"]["values"]) == f["best"]
        assert 0 <= f["best_auc_any"] <= 1 and f["best_log_loss"] > 0
    assert "PASS" in cli.output or "FAIL" in cli.output
    client = MlflowClient(f"sqlite:///{tmp_path / 'bench' / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("bench-search").experiment_id])
    assert [a.path for a in client.list_artifacts(run.info.run_id) if a.path.endswith(".png")]
    assert list((tmp_path / "bench").glob("best-so-far-*.png"))
    assert client.search_registered_models() == []  # a bench variant is no candidate for champion


def test_bench_search_estimate_prices_a_search_before_running_it(tiny_rsna, tmp_path):
    """--estimate: trials x steps x step time, scaled by the step fraction and the packing factor read
    from earlier bench JSON; a step time measured on a CPU says so; unreadable input exits 2."""
    import json
    import re

    from tests.conftest import write_space

    space = write_space(tmp_path, tiny_rsna, experiment={"optimizer": {"lr": {"grid_search": [0.003, 0.01]}}},
                        num_samples=3, resources={"cpu": 1, "gpu": 0.25})
    (tmp_path / "search.json").write_text(json.dumps({"variants": {"asha": {"steps_ratio": 0.3}}}))
    (tmp_path / "packing.json").write_text(json.dumps({"rows": [
        {"trials": 1, "gpu": 1.0, "oom": False, "samples_per_s": 100.0},
        {"trials": 4, "gpu": 0.25, "oom": False, "samples_per_s": 250.0}]}))

    def estimate(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ich_tune", "bench", "search", "--estimate", str(space),
                               *extra], cwd=ROOT, capture_output=True, text=True)

    given = estimate("--step-time", "600", "--from-json", str(tmp_path / "search.json"),
                     "--packing-json", str(tmp_path / "packing.json"))
    assert given.returncode == 0, given.stderr
    hours = [float(h) for h in re.findall(r"([\d.]+) GPU-hours", given.stdout)]
    assert hours == pytest.approx([6 * 6 * 600 / 3600, 6 * 6 * 600 / 3600 * 0.3 / 2.5], abs=0.05)
    assert "x2.50" in given.stdout

    measured = estimate()
    assert measured.returncode == 0, measured.stderr
    if not torch.cuda.is_available():
        assert "a CPU figure" in measured.stdout and "CPU-hours" in measured.stdout

    missing = estimate("--step-time", "0.5", "--from-json", str(tmp_path / "none.json"))
    assert missing.returncode == 2 and "none.json" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.parametrize("cpus, ended", [(2.0, False), (0.5, True)])
def test_bench_search_figures_are_nan_without_an_ended_run_or_a_slot(monkeypatch, tmp_path, cpus, ended):
    """No trial run that ended, or a cluster too small for one trial: NaN, not a crash after the search."""
    import math
    from types import SimpleNamespace

    import ray

    from ich_tune.bench.search import measure
    from ich_tune.tracking import client as tracking

    run = SimpleNamespace(info=SimpleNamespace(start_time=1000, end_time=5000 if ended else None))
    monkeypatch.setattr(tracking, "child_runs", lambda client, parent: [run])
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": cpus})
    config = SimpleNamespace(max_concurrent_trials=None, resources=SimpleNamespace(cpu=1.0), mode="max",
                             metric="val_accuracy")
    outcome = SimpleNamespace(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", parent_run_id="p",
                              trials=[])
    figures = measure(outcome, SimpleNamespace(config=config))
    assert math.isnan(figures["efficiency"]) and math.isnan(figures["best"])
    assert math.isnan(figures["wall_s"]) != ended and figures["concurrency"] == 0


def test_bench_predict_refuses_a_pool_of_one(capsys, tmp_path):
    from ich_tune.cli import main

    assert main(["bench", "predict", "--workers", "1", "--work", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "compares one process with a pool" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_bench_startup_shows_why_a_timed_start_up_failed(tmp_path):
    from ich_tune.bench.startup import start_up

    with pytest.raises(RuntimeError, match=r"failed \(exit status 1\):\n") as err:
        start_up(tmp_path / "absent", tmp_path / "cache", rescan=False, cold=False)
    assert str(tmp_path / "absent") in str(err.value).split("\n", 1)[1]  # the child's own message


def test_bench_predict_reads_every_slice_both_ways(tmp_path):
    """A small folder, one round: both ways decode the same slices, and the exit status is the
    verdict of the figures it prints and writes."""
    import json

    figures_path = tmp_path / "figures.json"
    command = ["bench", "predict", "--work", str(tmp_path), "--images", "40", "--rounds", "1",
               "--workers", "2", "--json", str(figures_path)]
    result = subprocess.run([sys.executable, "-m", "ich_tune", *command], cwd=ROOT, capture_output=True,
                            text=True)
    figures = json.loads(figures_path.read_text())
    assert result.returncode == (0 if figures["speedup"] >= 1.7 else 1), result.stderr
    assert figures["images"] >= 40 and figures["workers"] == 2
    decoded = [line.split(": ")[1].split(" images")[0] for line in result.stdout.splitlines()
               if line.startswith(("one process:", "2 processes,"))]
    assert len(decoded) == 2 and decoded[0] == decoded[1] and int(decoded[0]) > 0
    rates = figures["pooled_images_per_s"], figures["single_images_per_s"]
    assert figures["speedup"] == pytest.approx(rates[0] / rates[1])
    assert f"pool vs one process: {figures['speedup']:.2f}x" in result.stdout
    assert "Traceback" not in result.stderr
