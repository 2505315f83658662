"""`ich_tune report` against a real MLflow SQLite store filled the way a search fills it."""

import csv

import pytest
import yaml
from mlflow.tracking import MlflowClient

from ich_tune.cli import main
from ich_tune.errors import UserError
from ich_tune.report import search_report
from tests.test_weights import record_search, save_trained

TRIALS = [
    {"id": "t_00000", "params": {"optimizer": {"lr": 0.001}, "model": {"dropout": 0.1}},
     "metrics": {"val_accuracy": [0.70, 0.90], "val_log_loss": [0.50, 0.30]}},
    {"id": "t_00001", "params": {"optimizer": {"lr": 0.01}, "model": {"dropout": 0.1}},
     "metrics": {"val_accuracy": [0.80, 0.85], "val_log_loss": [0.40, 0.20]}},
    {"id": "t_00002", "params": {"optimizer": {"lr": 0.1}, "model": {"dropout": 0.1}},
     "metrics": {"val_accuracy": [0.60], "val_log_loss": [0.90]}, "stopped": True},
    {"id": "t_00003", "params": {"optimizer": {"lr": 1.0}, "model": {"dropout": 0.1}},
     "metrics": {"val_accuracy": [0.50]}, "status": "FAILED"},
]


@pytest.fixture(scope="module")
def store(tiny_rsna, tmp_path_factory) -> dict:
    """Search 'demo' recorded twice (the later run is the one reported by default), and 'other'."""
    trained, _ = save_trained(tiny_rsna, tmp_path_factory.mktemp("trained"))
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    first = record_search(uri, "demo", trained, TRIALS[:1])
    latest = record_search(uri, "demo", trained, TRIALS)
    record_search(uri, "other", None, TRIALS[:1], tags={"ich_tune.metric": "val_log_loss"})
    return {"uri": uri, "first": first, "latest": latest, "config": (trained / "config.yaml").read_text()}


def table_rows(text: str) -> list[list[str]]:
    """The trial rows of the table (header excluded), split on runs of spaces."""
    lines = text.split("\n\n")[1].splitlines()
    return [line.split() for line in lines[1:]]


def test_sorts_by_a_chosen_metric_and_prints_the_best_config(store):
    text = search_report("demo", sort="val_log_loss", tracking_uri=store["uri"])
    assert f"run {store['latest']}" in text and "sorted by best val_log_loss (lower is better)" in text
    header = text.split("\n\n")[1].splitlines()[0].split()
    assert header == ["trial", "optimizer.lr", "steps", "best", "val_log_loss", "ended"]  # dropout: same
    rows = table_rows(text)
    assert [r[0] for r in rows] == ["t_00001", "t_00000", "t_00002", "t_00003"]  # no value: last
    assert rows[0] == ["t_00001", "0.01", "2", "0.2000", "finished"]
    assert rows[2][-2:] == ["stopped", "early"] and rows[3][-2:] == ["-", "error"]
    best = text.split("# best config (trial t_00000; best/config.yaml of run ")[1]
    assert yaml.safe_load(best.split("\n", 1)[1].split("\n\ncompare trials")[0]) == yaml.safe_load(
        store["config"])


def test_higher_is_better_for_accuracy(store):
    text = search_report("demo", sort="val_accuracy", tracking_uri=store["uri"])
    assert "(higher is better)" in text
    assert [r[0] for r in table_rows(text)] == ["t_00000", "t_00001", "t_00002", "t_00003"]


def test_default_metric_is_the_searchs(store, tmp_path):
    client = MlflowClient(store["uri"])
    trials_csv = tmp_path / "trials.csv"
    with open(trials_csv, "w", newline="") as f:
        csv.writer(f).writerow(["trial_id", "status", "steps", "stopped_early", "best_val_log_loss", "seed"])
    client.log_artifact(store["latest"], str(trials_csv))
    assert "sorted by best val_log_loss" in search_report("demo", tracking_uri=store["uri"])
    assert "sorted by best val_log_loss" in search_report("other", tracking_uri=store["uri"])  # its tag
    first = search_report("demo", tracking_uri=store["uri"], run_id=store["first"])  # no trials.csv
    assert "sorted by best val_accuracy" in first and len(table_rows(first)) == 1


@pytest.mark.parametrize("args, message", [
    ({"name": "nope"}, r"no search named 'nope' .*\(known: demo, other\)"),
    ({"name": "demo", "sort": "val_auc"}, "--sort val_auc: .*one of step, val_accuracy, val_log_loss"),
    ({"name": "demo", "run_id": "0" * 32}, "no such MLflow run"),
])
def test_unknown_names_list_the_known_ones(store, args, message):
    with pytest.raises(UserError, match=message):
        search_report(tracking_uri=store["uri"], **args)


def test_run_of_another_search_is_refused(store):
    with pytest.raises(UserError, match="not a search run of 'other'"):
        search_report("other", tracking_uri=store["uri"], run_id=store["latest"])


def test_cli_report_prints_and_fails_in_one_line(store, capsys):
    assert main(["report", "demo", "--tracking-uri", store["uri"], "--sort", "val_log_loss"]) == 0
    assert "t_00001" in capsys.readouterr().out
    assert main(["report", "nope", "--tracking-uri", store["uri"]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no search named 'nope'") and err.count("\n") == 1


def test_cli_report_without_a_database_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["report", "demo"]) == 2
    err = capsys.readouterr().err
    assert f"no MLflow database at {tmp_path / 'runs' / 'mlflow.db'}" in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()
