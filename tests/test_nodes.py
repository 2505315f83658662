"""Data on every node and joining a running cluster: real Ray nodes started with `ray start` on this
machine, each with a cache folder of its own, a real search through the CLI, and real processes
racing for one cache."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import Cli, free_port, shared_cache, tiny_tree, write_space

TOKEN = secrets.token_hex(16)


def complete_caches(folder: Path) -> list[Path]:
    return sorted(p.parent for p in folder.glob("*/manifest.json"))


@contextlib.contextmanager
def ray_node(args: list[str], env: dict, log: Path) -> Iterator[None]:
    """`ray start --block ARGS` in its own process group, which is ended with every Ray process of the
    node when the test is done, even when it fails."""
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--block", *args],
                                   stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text():
            assert process.poll() is None, f"ray start failed:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"ray start did not finish:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@dataclass
class TwoNodes:
    address: str
    temp_dir: Path  # Ray's session folders: runtime environments are unpacked there
    head_cache: Path  # each node's XDG_CACHE_HOME, so each has a cache folder of its own
    worker_cache: Path


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory) -> Iterator[TwoNodes]:
    """A head and a worker node of one CPU each, token authentication on, on this machine."""
    folder = tmp_path_factory.mktemp("nodes")
    temp_dir = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN, "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]
    head = [*common, "--head", "--port", str(port), "--temp-dir", str(temp_dir), "--include-dashboard",
            "false", "--ray-client-server-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port())]
    worker = [*common, "--address", f"127.0.0.1:{port}", "--dashboard-agent-listen-port", str(free_port())]
    nodes = TwoNodes(f"127.0.0.1:{port}", temp_dir, folder / "head-cache", folder / "worker-cache")
    try:
        with ray_node(head, {**env, "XDG_CACHE_HOME": str(nodes.head_cache)}, folder / "head.log"), \
                ray_node(worker, {**env, "XDG_CACHE_HOME": str(nodes.worker_cache)}, folder / "worker.log"):
            yield nodes
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow  # it starts the two nodes
def test_a_refused_token_is_one_message(two_nodes, tiny_rsna, tmp_path):
    space = write_space(tmp_path, tiny_rsna, experiment={"data": {"cache_dir": str(shared_cache(tiny_rsna))}})
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "RAY_gcs_server_port_wait_time_s": "1"}  # one try, not 20 s of them
    with Cli("run", str(space), "--address", two_nodes.address, log=tmp_path / "run.log", env=env) as run:
        status = run.wait(180)
    errors = [line for line in run.output.splitlines() if line.startswith("error:")]
    assert status == 2, run.output
    assert "Traceback" not in run.output
    assert len(errors) == 1, run.output
    assert errors[0].startswith(f"error: Ray at {two_nodes.address} requires its authentication token and it "
                                "refused the token sent (RAY_AUTH_MODE is token).")
    assert "RAY_AUTH_TOKEN" in errors[0] and "auth_token" in errors[0]


def test_a_missing_token_is_one_message(tmp_path):
    """Token mode on and no token anywhere: Ray refuses before it connects, so no cluster is needed."""
    address = f"127.0.0.1:{free_port()}"
    code = textwrap.dedent("""
        import sys
        from ich_tune.search.cluster import start_ray
        from ich_tune.errors import UserError
        try:
            start_ray(sys.argv[1])
        except UserError as err:
            sys.exit(str(err))
        """)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "", "HOME": str(tmp_path)}  # no file
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    done = subprocess.run([sys.executable, "-c", code, address], env=env, capture_output=True, text=True,
                          timeout=120, start_new_session=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith(f"Ray at {address} requires its authentication token and no token was found "
                              "(RAY_AUTH_MODE is token)."), done.stderr
    assert f"{tmp_path}/.ray/auth_token" in message and "RAY_AUTH_TOKEN" in message


@pytest.mark.slow
def test_a_search_joins_the_cluster_and_every_node_prepares_its_data(two_nodes, tiny_rsna, tmp_path):
    """Through RAY_ADDRESS, as inside `ray job submit`: two data variants (lod 0 and 1), prepared on
    each node in its own cache folder before the trials, the package shipped to the workers."""
    tree = tiny_tree(tiny_rsna, tmp_path, data={"lod": {"grid_search": [0, 1]}})
    del tree["data"]["cache_dir"]  # each node's default, under its own XDG_CACHE_HOME
    space = write_space(tmp_path, tiny_rsna, scheduler={"name": "fifo"})
    settings = yaml.safe_load(space.read_text())
    space.write_text(yaml.safe_dump({**settings, "experiment": tree}))
    driver_cache = tmp_path / "driver-cache"
    env = {"RAY_ADDRESS": two_nodes.address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN,
           "XDG_CACHE_HOME": str(driver_cache)}
    with Cli("run", str(space), "--name", "joined", log=tmp_path / "run.log", env=env) as run:
        status = run.wait(400)
    assert status == 0, run.output[-6000:]
    assert "data: preparing 2 caches on each of 2 node(s)" in run.output
    ready = re.findall(r"data: node \S+ \((\w+)\) ready: (.+)", run.output)
    assert len({node for node, _ in ready}) == 2, run.output
    for cache_home in (two_nodes.head_cache, two_nodes.worker_cache):
        caches = complete_caches(cache_home / "ich_tune")
        assert len(caches) == 2  # one per variant, on this node
        sizes = sorted(yaml.safe_load((c / "manifest.json").read_text())["params"]["size"] for c in caches)
        assert sizes == [32, 64]
        assert any(", ".join(str(c) for c in caches) == paths for _, paths in ready)
    assert len(complete_caches(driver_cache / "ich_tune")) == 1  # the driver's own: the first variant only
    finished = re.findall(r"^\w+ +[01] +6 +\S+ +(?:\S+ +)?finished$", run.output, re.MULTILINE)  # vs best
    assert len(finished) == 2, run.output[-4000:]
    unpacked = "session_*/runtime_resources/py_modules_files/*/ich_tune/search/nodes.py"
    shipped = list(two_nodes.temp_dir.glob(unpacked))
    assert shipped, "the ich_tune package did not reach the nodes through the runtime environment"


def test_a_late_node_is_prepared_for_its_first_trial_which_never_builds(ray_cluster, tiny_config):
    """No node prepared yet, as for a node that joins during the search: its first trial waits for the
    node's preparation. Then the cache goes: a trial there fails with one line saying why and builds
    nothing; so does a trial whose data settings were never prepared."""
    import ray

    from ich_tune.search.nodes import DataOnNodes

    cfg = tiny_config()
    data = DataOnNodes([cfg.data])

    @ray.remote(num_cpus=0)
    def trial(settings: DataOnNodes, wanted) -> Path:
        return settings.cache_for(wanted)

    cache = ray.get(trial.remote(data, cfg.data))
    assert complete_caches(Path(cfg.data.cache_dir)) == [cache]
    shutil.rmtree(cache)
    with pytest.raises(RuntimeError) as removed:
        ray.get(trial.remote(data, cfg.data))
    message = str(removed.value.cause)
    assert re.fullmatch(rf"no preprocessed data on node \S+ \(\w+\): {cache} was removed after the node was "
                        r"prepared; .*--resume.*", message), message
    assert complete_caches(Path(cfg.data.cache_dir)) == []

    other = tiny_config(data={"lod": 0}).data
    with pytest.raises(RuntimeError, match="for this trial's data settings: they were not among those"):
        ray.get(trial.remote(data, other))
    assert complete_caches(Path(cfg.data.cache_dir)) == []


def test_a_failed_preparation_is_tried_again_once_its_cause_is_fixed(ray_cluster, tiny_rsna, tiny_config,
                                                                      tmp_path):
    """Data missing when the node is prepared: the search stops with one message. Once the data is
    there, the next ask prepares the node rather than repeating the old failure."""
    from ich_tune.errors import UserError
    from ich_tune.search.nodes import DataOnNodes

    later = tmp_path / "later"
    data = DataOnNodes([tiny_config(data={"root": str(later)}).data])
    with pytest.raises(UserError, match=rf"^data on node .*{later}"):
        data.prepare({"cpu": 1, "gpu": 0})
    shutil.copytree(tiny_rsna, later)
    data.prepare({"cpu": 1, "gpu": 0})
    assert len(complete_caches(tmp_path / "cache")) == 1


def test_a_trial_no_node_can_hold_is_one_message(ray_cluster, tiny_config):
    """Tune would keep such a trial pending forever."""
    from ich_tune.errors import UserError
    from ich_tune.search.nodes import DataOnNodes

    data = DataOnNodes([tiny_config().data])
    with pytest.raises(UserError, match=r"asks for 64 CPU and 0 GPU .* the largest node has 2 CPU and 1 GPU"):
        data.prepare({"cpu": 64, "gpu": 0})


def test_rescan_reaches_every_node(ray_cluster, tiny_rsna, tiny_config, tmp_path):
    """run --rescan: a node's preparation checks every file, and sees one rewritten in place."""
    from ich_tune.data.cache import find_dicom_files, open_cache
    from ich_tune.data.prepare import prepare_cache
    from ich_tune.search.nodes import DataOnNodes

    root = shutil.copytree(tiny_rsna, tmp_path / "data")
    for folder in (root, *root.rglob("*")):  # changed long ago: the cheap check trusts it
        os.utime(folder, (time.time() - 60, time.time() - 60))
    cfg = tiny_config(data={"root": str(root)})
    old = open_cache(prepare_cache(cfg.data))
    files = find_dicom_files(root)
    shutil.copyfile(files[old.ids[1]], files[old.ids[0]])  # the folder's mtime stays: only a rescan sees it
    DataOnNodes([cfg.data], rescan=True).prepare({"cpu": 1, "gpu": 0})
    assert len(complete_caches(tmp_path / "cache")) == 2


REFUSED = "test: flock refused"
ANNOUNCE_REFUSED = f"""
import fcntl

_flock = fcntl.flock


def _announced(fd, operation):
    try:
        _flock(fd, operation)
    except BlockingIOError:
        print({REFUSED!r}, flush=True)
        raise


fcntl.flock = _announced
"""  # a sitecustomize.py: filelock waits for a held lock by asking for it again without blocking


def test_two_processes_building_one_cache_at_once_leave_one_valid_cache(tiny_rsna, tmp_path):
    """Two `preprocess` processes start on a cache dir whose build lock is held, as by a third builder:
    both wait for the lock, then one builds and the other finds its cache."""
    from ich_tune.data.cache import open_cache
    from ich_tune.data.prepare import prepare_cache
    from ich_tune.experiment import build_experiment

    cache_dir = tmp_path / "cache"
    tree = tiny_tree(tiny_rsna, cache_dir, data={"workers": 1})
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(yaml.safe_dump(tree))
    path = prepare_cache(build_experiment(tree, {}).data)  # to learn the key
    shutil.rmtree(path)
    with open(cache_dir / f"{path.name}.lock", "w") as lock, contextlib.ExitStack() as stack:
        import fcntl

        fcntl.flock(lock, fcntl.LOCK_EX)
        hook = tmp_path / "hook"
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(ANNOUNCE_REFUSED)
        hooked = {"PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))}
        builders = [stack.enter_context(Cli("preprocess", str(experiment), log=tmp_path / f"build{i}.log",
                                            env=hooked)) for i in range(2)]
        deadline = time.monotonic() + 120
        while not all(REFUSED in b.output for b in builders):
            assert all(b.process.poll() is None for b in builders), [b.output for b in builders]
            assert time.monotonic() < deadline, "the builders never waited for the lock"
            time.sleep(0.05)
        fcntl.flock(lock, fcntl.LOCK_UN)
        statuses = [b.wait(120) for b in builders]
    assert statuses == [0, 0], [b.output for b in builders]
    assert [f"cache: {path}" in b.output for b in builders] == [True, True]
    assert sum("preprocess: 48 slices" in b.output for b in builders) == 1  # built once
    assert complete_caches(cache_dir) == [path]
    assert list(cache_dir.glob("*.partial-*")) == []
    cache = open_cache(path)
    assert cache.images.shape[0] == cache.manifest["images"] == 48
    assert cache.valid.sum() == cache.manifest["decoded"]


def test_data_variants_are_the_listed_cache_settings_and_a_sampled_one_is_refused(tiny_rsna, tmp_path):
    """lod x channels listed: one cache each; a searched key that only changes how the cache is read adds
    none; lod drawn from a range cannot be prepared ahead, and the message names the file and key."""
    from ich_tune.errors import ConfigError
    from ich_tune.experiment import load_search
    from ich_tune.search.nodes import data_variants

    space = write_space(tmp_path, tiny_rsna, experiment={"data": {
        "lod": {"grid_search": [0, 1]}, "channels": {"choice": [["brain"], ["brain", "bone"]]},
        "train_fraction": {"uniform": {"lower": 0.5, "upper": 0.8}}}})
    search = load_search(space)
    variants = data_variants(search, search.experiment)
    assert sorted((v.size, len(v.channels)) for v in variants) == [(32, 1), (32, 2), (64, 1), (64, 2)]

    drawn = {"randint": {"lower": 0, "upper": 2}}
    search = load_search(write_space(tmp_path, tiny_rsna, experiment={"data": {"lod": drawn}}))
    refused = rf"{tmp_path}/space.yaml:\d+: key 'data.lod': randint\(lower=0, upper=2\) changes the"
    with pytest.raises(ConfigError, match=refused + r" preprocessed cache.*choice: \[...\]"):
        data_variants(search, search.experiment)
