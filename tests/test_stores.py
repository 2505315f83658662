"""Which MLflow store each verb uses, in MLflow's own order (--tracking-uri, the search file,
MLFLOW_TRACKING_URI, runs/mlflow.db), and links into MLflow 3's UI that land on the runs.

The last test runs a real search, `report` and `predict --model search:NAME` against a real
`mlflow server` named only by MLFLOW_TRACKING_URI.
"""

import contextlib
import io
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ich_tune.cli import main
from ich_tune.tracking.client import resolve_stores, run_page, search_pages, ui_hint
from ich_tune.tracking.tags import TAG_PARENT, TAG_TRIAL_ID
from tests.conftest import Cli, shared_cache, write_space
from tests.services import mlflow_server


def test_the_flag_then_the_search_file_then_the_environment_then_runs_mlflow_db(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    default = f"sqlite:///{tmp_path.resolve() / 'runs' / 'mlflow.db'}"
    stores = resolve_stores(None)
    assert (stores.tracking_uri, stores.tracking_from) == (default, "default: runs/mlflow.db")
    assert stores.describe() == f"MLflow: {default} (default: runs/mlflow.db)"
    local = resolve_stores(None, None, tmp_path / "local")
    assert local.tracking_uri == f"sqlite:///{tmp_path.resolve() / 'local' / 'mlflow.db'}"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-env:5000")
    assert resolve_stores(None).describe() == "MLflow: http://from-env:5000 (from MLFLOW_TRACKING_URI)"
    assert resolve_stores(None, None, tmp_path / "local").tracking_uri == "http://from-env:5000"
    assert resolve_stores(None, "http://from-file:5000").describe() == \
        "MLflow: http://from-file:5000 (from the search file's tracking_uri)"
    assert resolve_stores("http://from-flag:5000", "http://from-file:5000").describe() == \
        "MLflow: http://from-flag:5000 (from --tracking-uri)"


def test_the_registry_is_the_tracking_store_unless_mlflow_registry_uri_names_one(monkeypatch):
    stores = resolve_stores("http://tracking:5000")
    assert stores.registry_uri == "http://tracking:5000"
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "http://registry:5000")
    stores = resolve_stores("http://tracking:5000")
    assert (stores.registry_uri, stores.registry_from) == ("http://registry:5000", "from MLFLOW_REGISTRY_URI")
    assert stores.describe() == ("MLflow: http://tracking:5000 (from --tracking-uri); model registry: "
                                 "http://registry:5000 (from MLFLOW_REGISTRY_URI)")


def test_links_open_the_runs_table_and_a_run_page():
    assert run_page("http://mlflow.lab:5000/", "3") == "http://mlflow.lab:5000/#/experiments/3/runs"
    assert run_page("http://mlflow.lab:5000", "3", "ab12") == "http://mlflow.lab:5000/#/experiments/3/runs/ab12"
    assert run_page("sqlite:////data/mlflow.db", "3", "ab12") == "http://127.0.0.1:5000/#/experiments/3/runs/ab12"
    assert ui_hint("sqlite:////data/mlflow.db", "3") == (
        "mlflow ui --backend-store-uri sqlite:////data/mlflow.db, then open "
        "http://127.0.0.1:5000/#/experiments/3/runs")


def test_show_config_says_which_store_a_search_uses_and_why(tiny_rsna, tmp_path, monkeypatch, capsys):
    space = write_space(tmp_path, tiny_rsna)
    assert main(["show-config", str(space)]) == 0
    database = tmp_path / "runs" / "mlflow.db"
    assert f"# MLflow: sqlite:///{database} (default: {database})\n" in capsys.readouterr().out
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-env:5000")
    assert main(["show-config", str(space)]) == 0
    assert "# MLflow: http://from-env:5000 (from MLFLOW_TRACKING_URI)\n" in capsys.readouterr().out


def test_the_summary_links_the_best_trials_run(recorded_search):
    client = MlflowClient(recorded_search.tracking_uri)
    experiment = client.get_experiment_by_name("space").experiment_id
    [parent] = client.search_runs([experiment], "tags.`ich_tune.search_dir` LIKE '%'")
    best = parent.data.tags["ich_tune.best_trial"]
    [child] = client.search_runs([experiment], f"tags.`{TAG_PARENT}` = '{parent.info.run_id}' AND "
                                 f"tags.`{TAG_TRIAL_ID}` = '{best}'")
    page = f"http://127.0.0.1:5000/#/experiments/{experiment}/runs/{child.info.run_id}"
    assert f"  best trial's MLflow run: {page}\n" in recorded_search.output
    assert f"  compare trials: mlflow ui --backend-store-uri {recorded_search.tracking_uri}, then open " \
           f"http://127.0.0.1:5000/#/experiments/{experiment}/runs\n" in recorded_search.output
    assert search_pages(recorded_search.tracking_uri, parent.info.run_id, "no-such-trial")[1] == \
        f"http://127.0.0.1:5000/#/experiments/{experiment}/runs"


@pytest.mark.slow
def test_mlflow_tracking_uri_alone_names_the_store_of_run_report_and_predict(
        ray_cluster, tiny_rsna, tmp_path, monkeypatch):
    with mlflow_server(tmp_path / "server") as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.chdir(tmp_path)  # where runs/mlflow.db, the default store, would be
        space = write_space(tmp_path, tiny_rsna, experiment={
            "data": {"cache_dir": str(shared_cache(tiny_rsna))}},
            name="by-env", num_train_steps=3, scheduler={"name": "fifo"})
        said, reported = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(said):
            assert main(["run", str(space), "--name", "r"]) == 0, said.getvalue()
        with contextlib.redirect_stdout(reported):
            assert main(["report", "by-env"]) == 0
        said, reported = said.getvalue(), reported.getvalue()
        assert f"MLflow: {url} (from MLFLOW_TRACKING_URI)\n" in said
        assert not (tmp_path / "runs" / "mlflow.db").exists()
        client = MlflowClient(url)
        experiment = client.get_experiment_by_name("by-env").experiment_id
        [child] = client.search_runs([experiment], f"tags.`{TAG_PARENT}` LIKE '%'")
        assert f"best trial's MLflow run: {url}/#/experiments/{experiment}/runs/{child.info.run_id}\n" in said
        assert "what mattered: no searched keys, nothing to rank" in said
        assert reported.startswith("search 'by-env', run ") and child.data.tags[TAG_TRIAL_ID] in reported
        assert f"compare trials: open {url}/#/experiments/{experiment}/runs\n" in reported

        submission = tmp_path / "submission.csv"
        dicoms = tiny_rsna / "stage_2_train"
        with Cli("predict", "--model", "search:by-env", "--dicom-dir", str(dicoms), "--out", str(submission),
                 "--workers", "1", log=tmp_path / "predict.log") as cli:
            assert cli.wait(300) == 0, cli.output
    slices = len(list(Path(dicoms).glob("*.dcm")))
    assert len(submission.read_text().splitlines()) == 1 + 6 * slices
