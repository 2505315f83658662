"""`ich_tune report` on MLflow stores written by real searches through the real tracking callback.

The expected values come from Ray's own result files of the same trials, not from MLflow.
"""

import json
import math
import re
import shutil

import pytest
import yaml
from mlflow.tracking import MlflowClient

from ich_tune.cli import main
from ich_tune.errors import UserError
from ich_tune.tracking.report import search_report


@pytest.fixture(scope="module")
def measured(recorded_search) -> dict:
    """Per learning rate of the recorded search: Ray's config and validation rows of that trial."""
    trials = {}
    for folder in recorded_search.run_dir.glob("run_trial_*"):
        config = json.loads((folder / "params.json").read_text())
        rows = [json.loads(line) for line in (folder / "result.json").read_text().splitlines()]
        trials[config["optimizer"]["lr"]] = {
            "config": config, "last": rows[-1], "validations": [r for r in rows if "ended" not in r]}
    assert sorted(trials) == [1e-7, 0.05, 1e30]
    return trials


def best_of(rows: list[dict], metric: str, higher: bool):
    values = [r[metric] for r in rows if isinstance(r.get(metric), float) and math.isfinite(r[metric])]
    return (max if higher else min)(values) if values else None


def table(text: str) -> list[dict]:
    """The trials table of a report, one dict per row keyed by the header's columns."""
    lines = text.split("\n\n")[1].splitlines()
    header = re.split(r"\s{2,}", lines[0])
    return [dict(zip(header, re.split(r"\s{2,}", line), strict=True)) for line in lines[1:]]


@pytest.mark.parametrize("metric, higher", [("val_log_loss", False), ("val_accuracy", True)])
def test_sorts_by_a_chosen_metric_best_first(recorded_search, measured, metric, higher):
    text = search_report("space", sort=metric, tracking_uri=recorded_search.tracking_uri)
    assert f"sorted by best {metric} ({'higher' if higher else 'lower'} is better)" in text
    rows = table(text)
    assert [r["optimizer.lr"] for r in rows][-1] == "1e+30"  # diverged: nothing measured, last
    values = {float(r["optimizer.lr"]): r[f"best {metric}"] for r in rows}
    expected = {lr: best_of(trial["validations"], metric, higher) for lr, trial in measured.items()}
    assert values == {lr: "-" if v is None else f"{v:.4f}" for lr, v in expected.items()}
    shown = [float(r[f"best {metric}"]) for r in rows[:-1]]
    assert len(set(shown)) == len(shown) and shown == sorted(shown, reverse=higher)


def test_shows_how_each_trial_ended(recorded_search, measured):
    text = search_report("space", tracking_uri=recorded_search.tracking_uri)
    rows = {r["optimizer.lr"]: r for r in table(text)}
    assert rows["0.05"]["ended"] == "finished" and rows["0.05"]["steps"] == "9"
    assert rows["1e-07"]["ended"] == "stopped early" and rows["1e-07"]["steps"] == "3"
    diverged = measured[1e30]["last"]
    assert rows["1e+30"]["ended"] == f"diverged: {diverged['message']}"
    assert re.fullmatch(r"step \d+: the training loss is (nan|inf)\. Lower optimizer\.lr .*",
                        diverged["message"])


def test_prints_the_best_config(recorded_search, measured):
    text = search_report("space", tracking_uri=recorded_search.tracking_uri)
    completed = {lr: best_of(t["validations"], "val_log_loss", False) for lr, t in measured.items() if lr < 1}
    best_lr = min(completed, key=completed.get)
    trial_id = measured[best_lr]["last"]["trial_id"]
    block = text.split(f"# best config (trial {trial_id}; best/config.yaml of run ")[1]
    config = block.split("\n", 1)[1].split("\n\ncompare trials")[0]
    assert yaml.safe_load(config) == measured[best_lr]["config"]


def test_default_metric_is_the_searchs(recorded_search, tmp_path):
    assert "sorted by best val_log_loss (lower is better)" in search_report(
        "space", tracking_uri=recorded_search.tracking_uri)  # its tag; val_accuracy otherwise
    database = tmp_path / "mlflow.db"  # a record from before the tag: the header of its trials.csv
    shutil.copy(recorded_search.tracking_uri.removeprefix("sqlite:///"), database)
    client = MlflowClient(f"sqlite:///{database}")
    [parent] = client.search_runs([client.get_experiment_by_name("space").experiment_id],
                                  "tags.`ich_tune.search_dir` LIKE '%'")
    for tag in ("ich_tune.metric", "ich_tune.mode"):
        client.delete_tag(parent.info.run_id, tag)
    assert "sorted by best val_log_loss (lower is better)" in search_report(
        "space", tracking_uri=f"sqlite:///{database}")


def test_reports_the_latest_run_unless_told_which(search_history):
    latest = search_report("halfres", tracking_uri=search_history.tracking_uri)
    assert f"run {search_history.weights_removed} (weights_removed, finished): 1 trials" in latest
    older = search_report("halfres", tracking_uri=search_history.tracking_uri, run_id=search_history.older)
    assert f"run {search_history.older} (older, finished)" in older
    assert [r["ended"] for r in table(older)] == ["finished"]
    assert f"# best config (trial {table(older)[0]['trial']}; best/config.yaml of run" in older


def test_a_search_whose_every_trial_diverged_still_lists_them(search_history):
    text = search_report("halfres", tracking_uri=search_history.tracking_uri, run_id=search_history.failed)
    assert f"run {search_history.failed} (failed, failed): 1 trials" in text
    [row] = table(text)
    assert row["best val_log_loss"] == "-" and row["ended"].startswith("diverged: step ")
    assert "no best/config.yaml" in text


@pytest.mark.parametrize("args, message", [
    ({"name": "nope"}, r"no search named 'nope' .*\(known: halfres, space\)"),
    ({"name": "space", "sort": "val_auc"}, r"--sort val_auc: .*one of epoch, .*val_accuracy, .*val_log_loss"),
    ({"name": "space", "run_id": "0" * 32}, "--run 0{32}: no such MLflow run"),
])
def test_unknown_names_list_the_known_ones(search_history, args, message):
    with pytest.raises(UserError, match=message):
        search_report(tracking_uri=search_history.tracking_uri, **args)


def test_run_of_another_search_is_refused(search_history):
    with pytest.raises(UserError, match=f"--run {search_history.recorded}: not a search run of 'halfres'"):
        search_report("halfres", tracking_uri=search_history.tracking_uri, run_id=search_history.recorded)
    client = MlflowClient(search_history.tracking_uri)
    [trial] = client.search_runs([client.get_run(search_history.older).info.experiment_id],
                                 f"tags.`mlflow.parentRunId` = '{search_history.older}'")
    with pytest.raises(UserError, match="not a search run of 'halfres'"):
        search_report("halfres", tracking_uri=search_history.tracking_uri, run_id=trial.info.run_id)


def test_cli_report_prints_and_fails_in_one_line(recorded_search, measured, capsys):
    uri = recorded_search.tracking_uri
    assert main(["report", "space", "--tracking-uri", uri, "--sort", "val_log_loss"]) == 0
    assert measured[0.05]["last"]["trial_id"] in capsys.readouterr().out
    assert main(["report", "nope", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no search named 'nope'") and err.count("\n") == 1


def test_cli_report_without_a_database_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["report", "demo"]) == 2
    err = capsys.readouterr().err
    assert f"no MLflow database at {tmp_path / 'runs' / 'mlflow.db'}" in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()
