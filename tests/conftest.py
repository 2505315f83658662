"""Shared fixtures: a small synthetic RSNA-layout dataset, written once per test session."""

import contextlib
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from ich_tune.config.loader import merge
from ich_tune.experiment import build_experiment

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_rsna(tmp_path_factory) -> Path:
    """Real DICOM files and Kaggle CSVs: 8 studies x 6 slices at 64 px, with RSNA's quirks."""
    from ich_tune.data.synthetic import generate

    root = tmp_path_factory.mktemp("rsna")
    generate(root, studies=8, slices=6, size=64, seed=3, positive_rate=0.4, quirk_rate=0.05)
    return root


@pytest.fixture(scope="session", autouse=True)
def own_mlflow_stores():
    """Tests name their MLflow stores: a developer's MLFLOW_TRACKING_URI or MLFLOW_REGISTRY_URI would
    send their searches and reports elsewhere (ich_tune reads both, as MLflow does)."""
    with pytest.MonkeyPatch.context() as env:
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        env.delenv("MLFLOW_REGISTRY_URI", raising=False)
        yield


@contextlib.contextmanager
def logged_lines() -> Iterator[list[str]]:
    """The lines ich_tune logs for the user inside the block (what the CLI prints)."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("ich_tune")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture
def said() -> Iterator[list[str]]:
    """The lines ich_tune logs for the user while the test runs (what the CLI prints)."""
    with logged_lines() as lines:
        yield lines


def tiny_tree(root: Path, cache_dir: Path, **sections) -> dict:
    """An experiment tree small enough to train in a second: 3 windows at 32x32, 2 stages."""
    tree = {
        "data": {"root": str(root), "cache_dir": str(cache_dir), "full_size": 64, "lod": 1,
                 "channels": ["brain", "subdural", "bone"], "max_bad_fraction": 0.2},
        "model": {"hidden_dims": [8, 16], "dropout": 0.1},
        "loss": {"objective": "bce"},
        "optimizer": {"lr": 0.003},
        "schedule": {"warmup_steps": 2, "decay": "cosine"},
        "train": {"batch_size": 4, "max_steps": 6, "val_interval": 3},
        "logging": {"print_interval": 2, "tensorboard": False},
        "seed": 7,
    }
    return merge(tree, {}, sections, {})[0]


@pytest.fixture
def tiny_config(tiny_rsna, tmp_path):
    """A factory: tiny_config(train={"max_steps": 8}) -> ExperimentConfig."""
    return lambda **sections: build_experiment(tiny_tree(tiny_rsna, tmp_path / "cache", **sections), {})


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the in-process searches: 2 CPUs and 1 GPU declared as a logical resource."""
    import ray

    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def write_space(folder: Path, tiny_rsna: Path, experiment: dict | None = None, **settings) -> Path:
    """A search file over the tiny dataset, its storage (MLflow database included) in `folder`/runs."""
    space = {
        "experiment": tiny_tree(tiny_rsna, folder / "cache", **(experiment or {})),
        "num_train_steps": 6, "val_interval": 3, "metric": "val_log_loss", "mode": "min",
        "scheduler": {"name": "asha", "grace_period": 3, "reduction_factor": 2},
        "resources": {"cpu": 1, "gpu": 0}, "storage": str(folder / "runs"),
        **settings,
    }
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


@dataclass
class RecordedSearch:
    space: Path
    exit_status: int
    output: str  # what `run` printed
    run_dir: Path
    tracking_uri: str


@pytest.fixture(scope="session")
def recorded_search(ray_cluster, tiny_rsna, tmp_path_factory) -> RecordedSearch:
    """`ich_tune run` of a real search, recorded by the real MLflow callback, one trial at a time:
    lr 0.05 runs its 9 steps; lr 1e-7 is worse at the first rung (step 3), so ASHA stops it there;
    lr 1e30 diverges at its first steps. Read it, don't write to it: tests share it."""
    from ich_tune.cli import main

    folder = tmp_path_factory.mktemp("recorded")
    space = write_space(folder, tiny_rsna, experiment={
        "optimizer": {"name": "sgd", "momentum": 0.0, "lr": {"grid_search": [0.05, 1e-7, 1e30]}},
        "schedule": {"warmup_steps": 0}}, num_train_steps=9, max_concurrent_trials=1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(["run", str(space), "--name", "recorded"])
    return RecordedSearch(space, status, out.getvalue(), folder / "runs" / "space" / "recorded",
                          f"sqlite:///{folder / 'runs' / 'mlflow.db'}")


def shared_cache(tiny_rsna: Path) -> Path:
    """One preprocessed cache beside the dataset for every tiny experiment, built once per session."""
    return tiny_rsna.parent / "cache-for-weights"


@dataclass
class SearchHistory:
    """Parent run ids of search 'halfres', oldest first, in one MLflow store that also holds 'space'."""

    tracking_uri: str
    older: str  # finished, with its best weights (lr 0.003)
    newer: str  # finished, with its best weights (lr 0.01): what search:halfres must pick
    failed: str  # its only trial diverged, so it ended FAILED without weights
    weights_removed: str  # the latest: finished (lr 0.03), its best/weights.pt since deleted
    recorded: str  # the parent run of recorded_search's search 'space'


@pytest.fixture(scope="session")
def search_history(recorded_search, tiny_rsna, tmp_path_factory) -> SearchHistory:
    """`ich_tune run` of search 'halfres' four times (one 3-step trial each) into a copy of the
    recorded search's MLflow database. Read it, don't write to it: tests share it."""
    import shutil
    from urllib.parse import urlparse

    from mlflow.tracking import MlflowClient

    from ich_tune.cli import main

    folder = tmp_path_factory.mktemp("history")
    (folder / "runs").mkdir()
    shutil.copy(recorded_search.tracking_uri.removeprefix("sqlite:///"), folder / "runs" / "mlflow.db")
    uri = f"sqlite:///{folder / 'runs' / 'mlflow.db'}"
    client = MlflowClient(uri)
    parents = {}
    for name, optimizer, expected in [("older", {"lr": 0.003}, 0), ("newer", {"lr": 0.01}, 0),
                                      ("failed", {"name": "sgd", "lr": 1e30}, 1),
                                      ("weights_removed", {"lr": 0.03}, 0)]:
        (folder / name).mkdir()
        space = write_space(folder / name, tiny_rsna, experiment={
            "optimizer": optimizer, "data": {"cache_dir": str(shared_cache(tiny_rsna))}},
            name="halfres", num_train_steps=3, scheduler={"name": "fifo"}, storage=str(folder / "runs"))
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            status = main(["run", str(space), "--name", name])
        assert status == expected, out.getvalue()
        experiment = client.get_experiment_by_name("halfres").experiment_id
        run_dir = (folder / "runs" / "halfres" / name).resolve()
        [parent] = client.search_runs([experiment], f"tags.`ich_tune.search_dir` = '{run_dir}'")
        parents[name] = parent.info.run_id
    artifacts = Path(urlparse(client.get_run(parents["weights_removed"]).info.artifact_uri).path)
    (artifacts / "best" / "weights.pt").unlink()  # as a clean-up of old artifacts would
    space = client.get_experiment_by_name("space").experiment_id
    [recorded] = client.search_runs([space], "tags.`ich_tune.search_dir` LIKE '%'")
    return SearchHistory(uri, **parents, recorded=recorded.info.run_id)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (tests never use fixed ports)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cli:
    """`python -m ich_tune ...` in its own process group, output to a file; `stop()` ends the group.

    Use it as a context manager so a failing test never leaves a driver or its Ray behind.
    """

    def __init__(self, *args: str, log: Path, env: dict | None = None) -> None:
        import os
        import subprocess
        import sys

        self.log = log
        with open(log, "w") as out:  # the child keeps its own handle
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ich_tune", *args], cwd=ROOT, stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, "RAY_AUTH_MODE": "disabled", "TUNE_GLOBAL_CHECKPOINT_S": "1",
                     "ICH_TUNE_DASHBOARD_PORT": str(free_port()), **(env or {})})

    def wait(self, timeout: float) -> int:
        self.process.wait(timeout)
        return self.process.returncode

    @property
    def output(self) -> str:
        return self.log.read_text()

    def signal(self, number: int) -> None:
        self.process.send_signal(number)

    def stop(self) -> None:
        import os
        import signal

        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> "Cli":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
