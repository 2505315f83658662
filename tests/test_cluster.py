"""A search on a two-node Ray cluster (both nodes on 127.0.0.1), recording into a real `mlflow server`,
its trial folders and checkpoints in an S3 bucket (moto's S3 server). Midway, the worker node is
removed: its trials go on from their checkpoints on the head node.

One search serves both tests (a cluster and its trial workers take minutes to start on 2 cores). It
runs through the CLI in its own process with --address, so the session's local Ray in this process is
left alone; the cluster keeps its address file in its own temp folder, so a bare `ray.init()`
elsewhere on this machine never joins it.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ich_tune.errors import UserError
from ich_tune.search import storage
from ich_tune.tracking.client import child_runs
from ich_tune.tracking.report import search_report
from ich_tune.tracking.tags import TAG_NODE, TAG_RESTARTS, TAG_TRIAL_ID
from ich_tune.training.loop import CHECKPOINT_FILE
from tests.conftest import Cli, shared_cache, write_space
from tests.services import mlflow_server, s3_server

pytestmark = pytest.mark.slow
# Ray turns 127.0.0.1 in an address into this machine's interface address, where a cluster bound to
# loopback does not listen; Ray's switch for single-machine platforms keeps the driver on loopback
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
STEPS, VAL_INTERVAL = 30, 3
# what a cluster's nodes would have from their own environment; the endpoint is in the storage URI
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@dataclass
class ClusterSearch:
    space: Path
    storage: str  # the bucket's URI, its endpoint in the query
    tracking_uri: str
    s3: dict
    head: str  # node ids
    worker: str
    moved: set[str]  # run ids of the trials that had a checkpoint on the worker when it was removed
    exit_status: int
    output: str
    keys: list[str]  # the bucket's object keys after the search
    results: dict[str, list[dict]]  # trial id -> its results, as Ray wrote them to the bucket


@pytest.fixture(scope="module")
def cluster_search(tiny_rsna, tmp_path_factory) -> ClusterSearch:
    """Services, a head (1 CPU) and a worker node (2 CPUs and a custom resource) whose processes see
    the S3 credentials as a cluster's nodes would, and a 3-trial search across them (each trial takes
    a CPU, so both nodes train). The worker is removed once one of its trials has a checkpoint."""
    from ray.cluster_utils import Cluster

    folder = tmp_path_factory.mktemp("cluster")
    with ExitStack() as stack, ThreadPoolExecutor(2) as pool, pytest.MonkeyPatch.context() as env:
        servers = [mlflow_server(folder / "mlflow"), s3_server(folder / "s3")]
        starting = [pool.submit(server.__enter__) for server in servers]  # while the cluster starts
        for server, started in zip(servers, starting, strict=True):
            stack.callback(_stop, server, started)
        for name, value in {**CREDENTIALS, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                            "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray", dir="/tmp")}.items():
            env.setenv(name, value)
        nodes = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False,
            "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4}})
        try:
            worker = nodes.add_node(num_cpus=2, resources={"worker": 1}, node_ip_address="127.0.0.1")
            nodes.wait_for_nodes()
            url, s3 = (started.result() for started in starting)
            host = s3["endpoint"].removeprefix("http://")
            bucket_uri = f"s3://{s3['bucket']}/searches?endpoint_override={host}&scheme=http"
            space = write_space(folder, tiny_rsna, experiment={
                "data": {"cache_dir": str(shared_cache(tiny_rsna))},
                "optimizer": {"lr": {"grid_search": [0.003, 0.01, 0.03]}}},
                name="cluster", scheduler={"name": "fifo"}, num_train_steps=STEPS, val_interval=VAL_INTERVAL)
            client = MlflowClient(url)
            with Cli("run", str(space), "--address", nodes.address, "--storage", bucket_uri,
                     "--tracking-uri", url, "--local-dir", str(folder / "local"), "--name", "two",
                     log=folder / "run.log", env={**CREDENTIALS, **LOOPBACK}) as cli:
                moved = wait_for(lambda: _checkpointed_on(client, worker.node_id), cli, 300)
                nodes.remove_node(worker, allow_graceful=False)
                status = cli.wait(300)
            keys = bucket_keys(s3)
            yield ClusterSearch(space, bucket_uri, url, s3, nodes.head_node.node_id, worker.node_id, moved,
                                status, cli.output, keys, trial_results(s3, keys))
        finally:
            nodes.shutdown()


def test_search_on_two_nodes_records_into_a_server_and_a_bucket(cluster_search, tiny_rsna, tmp_path):
    search = cluster_search
    assert search.exit_status == 0, search.output[-4000:]
    host = search.s3["endpoint"].removeprefix("http://")
    run_dir = f"s3://ich-tune/searches/cluster/two?endpoint_override={host}&scheme=http"
    assert f"TensorBoard: copy the trials' tensorboard/ folders from {run_dir} to a local" in search.output
    assert f"compare trials: open {search.tracking_uri}" in search.output

    first_nodes = {trial: results[0]["node_id"] for trial, results in search.results.items()}
    assert set(first_nodes.values()) == {search.head, search.worker}  # the head fits one trial at once

    client = MlflowClient(search.tracking_uri)
    experiment = client.get_experiment_by_name("cluster")
    [parent] = client.search_runs([experiment.experiment_id], "tags.`ich_tune.search_dir` LIKE '%'")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["ich_tune.search_dir"] == run_dir
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:")
    children = child_runs(client, parent.info.run_id)
    assert all(run.info.artifact_uri.startswith("mlflow-artifacts:") for run in children)
    best_files = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "best")}
    assert {"weights.pt", "config.yaml"} <= best_files
    assert parent.data.tags["ich_tune.best_checkpoint"].startswith("s3://ich-tune/searches/cluster/two/")

    trials = {run.data.tags[TAG_TRIAL_ID] for run in children}
    checkpointed = {key.split("/")[3] for key in search.keys if key.endswith(f"/{CHECKPOINT_FILE}")}
    assert {t for t in trials if any(f"_{t}_" in trial_folder for trial_folder in checkpointed)} == trials
    print(f"\nhead {search.head[:8]}, worker {search.worker[:8]}; trials and the nodes of their results:")
    for trial, results in sorted(search.results.items()):
        path = " -> ".join(dict.fromkeys(r["node_id"][:8] for r in results))
        print(f"  {trial}  steps {[r['step'] for r in results]}  nodes {path}")
    print(f"parent run {parent.info.run_id}: {parent.info.artifact_uri}")
    for run in children:
        print(f"  trial {run.data.tags[TAG_TRIAL_ID]}: {run.info.artifact_uri}")

    shown = search_report("cluster", tracking_uri=search.tracking_uri)
    assert all(trial in shown for trial in trials) and "# best config" in shown
    assert f"compare trials: open {search.tracking_uri}/#/experiments/{experiment.experiment_id}" in shown

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    dicoms = tiny_rsna / "stage_2_train"
    status, output = run_elsewhere(elsewhere, "predict", "--model", "search:cluster", "--tracking-uri",
                                   search.tracking_uri, "--dicom-dir", str(dicoms),
                                   "--out", str(elsewhere / "submission.csv"))
    assert status == 0, output[-3000:]
    with open(elsewhere / "submission.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    images = {p.stem for p in dicoms.glob("*.dcm")}
    assert len(rows) == 6 * len(images)
    assert {row["ID"].rsplit("_", 1)[0] for row in rows} == images
    assert all(0.0 <= float(row["Label"]) <= 1.0 for row in rows)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["submission.csv"]  # no local store was made


def test_a_lost_worker_node_moves_its_trials_to_the_node_left(cluster_search):
    search = cluster_search
    assert search.exit_status == 0, search.output[-4000:]
    client = MlflowClient(search.tracking_uri)
    experiment = client.get_experiment_by_name("cluster")
    [parent] = client.search_runs([experiment.experiment_id], "tags.`ich_tune.search_dir` LIKE '%'")
    children = child_runs(client, parent.info.run_id)
    trial_ids = [run.data.tags[TAG_TRIAL_ID] for run in children]
    assert sorted(trial_ids) == sorted(search.results) and len(set(trial_ids)) == 3  # one run per trial
    assert {run.info.status for run in children} == {"FINISHED"}

    moved = [run for run in children if run.info.run_id in search.moved]
    assert moved
    for run in moved:
        results = search.results[run.data.tags[TAG_TRIAL_ID]]
        on_worker = [r["step"] for r in results if r["node_id"] == search.worker]
        on_head = [r["step"] for r in results if r["node_id"] == search.head]
        assert on_worker and on_head and min(on_head) > min(on_worker)  # from its checkpoint, not from 0
        assert on_head[-1] == STEPS
        assert run.data.tags[TAG_NODE] == search.head
        assert int(run.data.tags[TAG_RESTARTS]) >= 1
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_log_loss")]
        assert steps == list(range(VAL_INTERVAL, STEPS + 1, VAL_INTERVAL))  # each validation logged once
    print(f"\nworker {search.worker[:8]} removed; its checkpointed trials finished on the head: "
          f"{sorted(run.data.tags[TAG_TRIAL_ID] for run in moved)}")


def test_resume_finds_the_run_in_the_bucket_through_ray(cluster_search):
    from ich_tune.experiment import load_search
    from ich_tune.search.options import RunOptions
    from ich_tune.search.run_folder import resolve_run_dir

    bucket = f"storage={json.dumps(cluster_search.storage)}"
    search = load_search(cluster_search.space, [bucket])
    found = resolve_run_dir(search, RunOptions(resume=True))
    assert found == storage.join(cluster_search.storage, "cluster", "two")
    other = load_search(cluster_search.space, [bucket, "name=other"])
    with pytest.raises(UserError, match=r"--resume: no search to resume under s3://ich-tune/searches/other"):
        resolve_run_dir(other, RunOptions(resume=True))


def _stop(server, started) -> None:
    if started.exception() is None:  # waits for a start still under way
        server.__exit__(None, None, None)


def _checkpointed_on(client: MlflowClient, node_id: str) -> set[str] | None:
    """The trial runs training on `node_id` that have reported a validation (and its checkpoint)."""
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.`{TAG_NODE}` = '{node_id}' and metrics.step >= {VAL_INTERVAL}")
    return {run.info.run_id for run in runs} or None


def bucket_keys(s3: dict) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=s3["endpoint"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=s3["bucket"])
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def trial_results(s3: dict, keys: list[str]) -> dict[str, list[dict]]:
    """Each trial's results (result.json, one JSON object a line) read back from the bucket."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3["endpoint"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    results = {}
    for key in keys:
        if key.endswith("/result.json"):
            body = client.get_object(Bucket=s3["bucket"], Key=key)["Body"].read().decode()
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            results[lines[0]["trial_id"]] = lines
    return results


def run_elsewhere(folder: Path, *args: str) -> tuple[int, str]:
    """`python -m ich_tune ...` run from `folder`, in its own process group, ended if it overruns."""
    process = subprocess.Popen([sys.executable, "-m", "ich_tune", *args], cwd=folder, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=120)
        return process.returncode, output
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_for(probe, cli: Cli, timeout: float):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = probe()
        if found:
            return found
        assert cli.process.poll() is None, cli.output[-4000:]
        time.sleep(0.5)
    raise AssertionError(f"not seen within {timeout:.0f} s:\n{cli.output[-4000:]}")
