"""What mattered in a search: fANOVA importances over its finished trials, at the end of a search, on
its parent run and in `report`.

Synthetic trials where the learning rate alone drives the metric: it must rank first, every time.
"""

import json
import math
import random
from pathlib import Path

import pytest
import yaml
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from ich_tune.config.markers import Dimension
from ich_tune.tracking.importance import ARTIFACT, CHART, log_importance, what_mattered
from ich_tune.tracking.references import RESOLVED_ARTIFACT
from ich_tune.tracking.report import search_report
from ich_tune.tracking.tags import TAG_ENDED, TAG_METRIC, TAG_MODE, TAG_PARENT, TAG_SEARCH_DIR, TAG_TRIAL_ID
from ich_tune.trials import DIVERGED, FINISHED, STOPPED_EARLY, TrialOutcome

DIMENSIONS = [
    Dimension("optimizer.lr", "loguniform", {"lower": 1e-4, "upper": 1e-1}),
    Dimension("model.dropout", "uniform", {"lower": 0.0, "upper": 0.5}),
    Dimension("model.hidden_dims", "choice", ([8, 16], [16, 32])),
    Dimension("train.batch_size", "randint", {"lower": 2, "upper": 9}),
]


def trials(count: int, seed: int = 1) -> list[TrialOutcome]:
    """Random points of DIMENSIONS; the log loss is a parabola in log10(lr), the rest barely counts."""
    rng = random.Random(seed)
    made = []
    for index in range(count):
        params = {"optimizer.lr": 10 ** rng.uniform(-4, -1), "model.dropout": rng.uniform(0, 0.5),
                  "model.hidden_dims": rng.choice([[8, 16], [16, 32]]),
                  "train.batch_size": rng.randrange(2, 9)}
        loss = (math.log10(params["optimizer.lr"]) + 2.5) ** 2 + 0.01 * params["model.dropout"]
        made.append(TrialOutcome(f"t{index:02d}", (FINISHED, STOPPED_EARLY)[index % 2], 6,
                                 loss + rng.gauss(0, 0.01), params))
    return made


def test_the_key_that_drives_the_metric_ranks_first_and_the_numbers_repeat():
    found = what_mattered(trials(20), DIMENSIONS, "val_log_loss", "min")
    assert list(found.shares)[0] == "optimizer.lr" and found.shares["optimizer.lr"] > 0.6
    assert set(found.shares) == {d.path for d in DIMENSIONS} and math.isclose(sum(found.shares.values()), 1)
    assert found.trials == 20
    assert what_mattered(trials(20), DIMENSIONS, "val_log_loss", "min") == found
    assert what_mattered(trials(20)[::-1], DIMENSIONS[::-1], "val_log_loss", "min") == found  # any order
    assert found.line().startswith(f"what mattered: optimizer.lr {found.shares['optimizer.lr']:.2f}, ")
    assert found.line().endswith("(fANOVA: share of val_log_loss's variance over 20 finished trials)")


def test_values_read_back_from_mlflow_as_text_give_the_same_shares():
    as_text = [TrialOutcome(t.trial_id, t.status, t.steps, t.best, {k: str(v) for k, v in t.params.items()})
               for t in trials(12)]
    assert what_mattered(as_text, DIMENSIONS, "val_log_loss", "min").shares == \
        what_mattered(trials(12), DIMENSIONS, "val_log_loss", "min").shares


def test_only_finished_trials_with_a_finite_metric_count():
    some = trials(8)
    some[0].status, some[1].best, some[2].status = DIVERGED, math.nan, "error"
    assert what_mattered(some, DIMENSIONS, "val_log_loss", "min").trials == 5


@pytest.mark.parametrize("count, dimensions, said", [
    (4, DIMENSIONS, "what mattered: 4 finished trials with a finite val_log_loss, too few to say "
                    "(fANOVA needs 5)"),
    (20, DIMENSIONS[:1], "what mattered: one searched key (optimizer.lr), nothing to rank"),
    (20, [], "what mattered: no searched keys, nothing to rank"),
])
def test_too_few_trials_or_keys_is_one_line_instead_of_numbers(count, dimensions, said):
    found = what_mattered(trials(count), dimensions, "val_log_loss", "min")
    assert found.shares == {} and found.line() == said


def test_the_parent_run_gets_the_importances_and_their_chart(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment).info.run_id
    found = what_mattered(trials(10), DIMENSIONS, "val_log_loss", "min")
    log_importance(client, run, found)
    assert {f.path for f in client.list_artifacts(run)} == {ARTIFACT, CHART}
    record = json.loads(Path(client.download_artifacts(run, ARTIFACT, str(tmp_path))).read_text())
    assert record["importances"] == found.shares and record["finished_trials"] == 10
    assert Path(client.download_artifacts(run, CHART, str(tmp_path))).read_bytes().startswith(b"\x89PNG")


def test_report_computes_what_mattered_from_the_child_runs(tmp_path):
    """A search recorded by hand as the callback records one: params as text, the metric per step."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("hand", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment, tags={TAG_SEARCH_DIR: str(tmp_path / "runs"),
                                                 TAG_METRIC: "val_log_loss", TAG_MODE: "min"}).info.run_id
    markers = {"optimizer": {"lr": {"loguniform": {"lower": 1e-4, "upper": 1e-1}}},
               "model": {"dropout": {"uniform": {"lower": 0.0, "upper": 0.5}},
                         "hidden_dims": {"choice": [[8, 16], [16, 32]]}},
               "train": {"batch_size": {"randint": {"lower": 2, "upper": 9}}}}
    resolved = {"metric": "val_log_loss", "experiment": markers}
    client.log_text(parent, yaml.safe_dump(resolved), RESOLVED_ARTIFACT)
    made = trials(10)
    for trial in made:
        child = client.create_run(experiment, tags={TAG_PARENT: parent, TAG_TRIAL_ID: trial.trial_id,
                                                    TAG_ENDED: trial.status}).info.run_id
        metrics = [Metric("val_log_loss", trial.best + 1, 0, 3), Metric("val_log_loss", trial.best, 0, 6),
                   Metric("step", 6, 0, 6)]
        client.log_batch(child, params=[Param(k, str(v)) for k, v in trial.params.items()], metrics=metrics)
        client.set_terminated(child)
    expected = what_mattered(made, DIMENSIONS, "val_log_loss", "min").line()
    assert f"\n{expected}\n" in search_report("hand", tracking_uri=uri)


def test_a_search_of_one_key_says_so_in_its_summary_and_report(recorded_search):
    said = "what mattered: one searched key (optimizer.lr), nothing to rank"
    assert f"  {said}\n" in recorded_search.output
    assert f"\n{said}\n" in search_report("space", tracking_uri=recorded_search.tracking_uri)
    client = MlflowClient(recorded_search.tracking_uri)
    [parent] = client.search_runs([client.get_experiment_by_name("space").experiment_id],
                                  f"tags.`{TAG_SEARCH_DIR}` LIKE '%'")
    record = json.loads(Path(client.download_artifacts(parent.info.run_id, ARTIFACT)).read_text())
    assert record["importances"] == {} and record["finished_trials"] == 2  # lr 1e30 diverged
