"""A search's best model in a real `mlflow server`: a pyfunc model that loads without unpickling, a
registered version with what it was measured by, and the alias `champion` that only a better model on
the same metric and data takes.

Two real one-trial searches of one name go into one server: SGD lr 0.05, then lr 1e-7, which barely
leaves its starting point and so ends with the higher (worse) validation log loss.
"""

import contextlib
import io
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ich_tune.cli import main
from ich_tune.data.fingerprint import data_fingerprint
from ich_tune.data.labels import CLASSES
from ich_tune.data.prepare import prepare_cache
from ich_tune.errors import UserError
from ich_tune.experiment import load_search
from ich_tune.tracking import registry
from ich_tune.tracking.references import load_trained, resolve_weights
from tests.conftest import logged_lines, shared_cache, write_space
from tests.services import mlflow_server

NAME = "ich-demo"


@dataclass
class Searched:
    space: Path
    outcome: object  # search.SearchOutcome
    said: list[str]  # what the search logged
    noise: str  # warnings, MLflow's log records and stderr during the search


@dataclass
class Served:
    url: str
    first: Searched
    second: Searched


def search_into(url: str, folder: Path, tiny_rsna: Path, lr: float) -> Searched:
    """One 3-step SGD trial recorded in the server, everything it says captured."""
    from ich_tune.search.driver import run_search
    from ich_tune.search.options import RunOptions

    folder.mkdir()
    space = write_space(folder, tiny_rsna, experiment={
        "optimizer": {"name": "sgd", "momentum": 0.0, "lr": lr}, "schedule": {"warmup_steps": 0},
        "data": {"cache_dir": str(shared_cache(tiny_rsna))}},
        name=NAME, num_train_steps=3, scheduler={"name": "fifo"}, tracking_uri=url)
    stderr = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(stderr), \
            logged_lines() as said:  # the `said` fixture's lines, for a module-scoped fixture
        warnings.simplefilter("always")
        outcome = run_search(load_search(space), RunOptions(name="r"))
    records = [line for line in (Path(outcome.run_dir) / "driver.log").read_text().splitlines()
               if " mlflow" in line]  # MLflow's own log lines go to the run's driver.log
    assert records, "MLflow's log records were not captured"
    noise = "\n".join([*(str(w.message) for w in caught), *records, stderr.getvalue()])
    return Searched(space, outcome, said, noise)


@pytest.fixture(scope="module")
def served(ray_cluster, tiny_rsna, tmp_path_factory):
    folder = tmp_path_factory.mktemp("registry")
    before = mlflow.get_tracking_uri()
    with mlflow_server(folder / "server") as url, pytest.MonkeyPatch.context() as env:
        env.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri exports it; not past here
        first = search_into(url, folder / "first", tiny_rsna, 0.05)
        second = search_into(url, folder / "second", tiny_rsna, 1e-7)
        mlflow.set_tracking_uri(url)
        try:
            yield Served(url, first, second)
        finally:
            mlflow.set_tracking_uri(before)
            os.environ.pop("MLFLOW_TRACKING_URI", None)  # set_tracking_uri exports it; the tests after choose


def model_id(searched: Searched) -> str:
    [logged] = [re.match(r"MLflow model: models:/(m-[0-9a-f]{32})\b", line) for line in searched.said
                if line.startswith("MLflow model: ")]
    return logged.group(1)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return a.state_dict().keys() == b.state_dict().keys() and all(
        torch.equal(t, b.state_dict()[k]) for k, t in a.state_dict().items())


@pytest.mark.slow
def test_the_best_model_is_a_registered_version_and_the_champion(served):
    client = MlflowClient(served.url)
    outcome = served.first.outcome
    assert f"registered {NAME} version 1 (val_log_loss {outcome.best.best:.4f}); champion is now version 1 " \
           "(there was none)" in served.first.said
    version = client.get_model_version(NAME, "1")
    assert version.run_id == outcome.parent_run_id and version.source == f"models:/{model_id(served.first)}"
    assert version.aliases == ["champion"]
    tags = version.tags
    assert (tags[registry.TAG_METRIC], tags[registry.TAG_MODE]) == ("val_log_loss", "min")
    assert float(tags[registry.TAG_VALUE]) == outcome.best.best
    search = load_search(served.first.space)
    data = search.trial_experiment(search.first_values).data
    assert tags[registry.TAG_DATA] == data_fingerprint(prepare_cache(data), data)


@pytest.mark.slow
def test_the_logged_model_runs_no_code_from_its_files(served, tmp_path):
    for searched in (served.first, served.second):
        assert "pickle" not in searched.noise.lower(), searched.noise
    uri = f"models:/{model_id(served.first)}"
    folder = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path)))
    meta = mlflow.models.Model.load(folder / "MLmodel")
    assert meta.flavors.keys() == {"python_function"}
    assert meta.flavors["python_function"]["loader_module"] == "ich_tune.tracking.pyfunc"
    assert not [p for p in folder.rglob("*") if p.suffix in (".pkl", ".pickle")]
    assert "ich_tune" not in (folder / "requirements.txt").read_text()  # never fetched from an index by name
    assert meta.signature.inputs is None  # DICOM files in column `dicom`, or a prepared batch
    assert meta.signature.outputs.input_names()[:len(CLASSES)] == list(CLASSES)
    assert list(meta.load_input_example(str(folder)).columns) == ["dicom"]


@pytest.mark.slow
def test_the_champion_predicts_through_pyfunc_and_the_cli(served, tiny_rsna, tmp_path):
    batch = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)
    probs = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(batch)
    assert list(probs.columns) == list(CLASSES) and probs.shape == (4, 6)
    network, config = load_trained(f"models:/{NAME}@champion", served.url)
    with torch.no_grad():
        expected = torch.sigmoid(network(torch.from_numpy(batch))).numpy()
    np.testing.assert_allclose(probs.to_numpy(), expected, rtol=1e-6)
    direct, _ = load_trained(served.first.outcome.parent_run_id, served.url)
    assert same_weights(network, direct) and config.data.size == 32
    by_run = mlflow.pyfunc.load_model(f"runs:/{served.first.outcome.parent_run_id}/model")
    np.testing.assert_array_equal(by_run.predict(batch).to_numpy(), probs.to_numpy())

    out = tmp_path / "submission.csv"
    with contextlib.redirect_stdout(io.StringIO()):
        status = main(["predict", "--model", f"models:/{NAME}@champion", "--tracking-uri", served.url,
                       "--dicom-dir", str(tiny_rsna / "stage_2_train"), "--out", str(out)])
    slices = len(list((tiny_rsna / "stage_2_train").glob("*.dcm")))
    assert status == 0 and len(out.read_text().splitlines()) == 1 + 6 * slices


@pytest.mark.slow
def test_a_worse_search_leaves_the_champion_and_says_so(served):
    first, second = served.first.outcome.best.best, served.second.outcome.best.best
    assert second > first  # lr 1e-7 barely moved: a higher validation log loss
    assert f"registered {NAME} version 2 (val_log_loss {second:.4f}); champion stays version 1 " \
           f"(val_log_loss {second:.4f} does not beat its {first:.4f}; lower is better)" in served.second.said
    client = MlflowClient(served.url)
    assert client.get_registered_model(NAME).aliases == {"champion": "1"}
    assert f"MLflow model: models:/{model_id(served.second)}; registered as models:/{NAME}/2 (load with " \
           "mlflow.pyfunc.load_model, or --model for predict and evaluate)" in served.second.said


@pytest.mark.slow
def test_version_and_model_id_forms_resolve_to_their_weights(served):
    by_version, _ = load_trained(f"models:/{NAME}/2", served.url)
    by_id, _ = load_trained(f"models:/{model_id(served.second)}", served.url)
    direct, _ = load_trained(served.second.outcome.parent_run_id, served.url)
    champion, _ = load_trained(f"models:/{NAME}@champion", served.url)
    assert same_weights(by_version, direct) and same_weights(by_id, direct)
    assert not same_weights(by_version, champion)


@pytest.mark.slow
@pytest.mark.parametrize("spec, message", [
    (f"models:/{NAME}@best", f"{NAME} has no alias 'best' (aliases: champion -> version 1; versions: 1, 2)"),
    (f"models:/{NAME}/7", f"{NAME} has no version 7 (aliases: champion -> version 1; versions: 1, 2)"),
    ("models:/nothing@champion", f"no registered model 'nothing' in {{url}} (registered: {NAME})"),
    (f"models:/{NAME}", "give models:/<name>@<alias>, models:/<name>/<version> or models:/<model id>"),
    ("models:/m-" + "0" * 32, f"no logged model m-{'0' * 32} in {{url}}"),
])
def test_a_missing_model_is_one_message_listing_what_exists(served, tmp_path, spec, message):
    with pytest.raises(UserError, match="^model '" + spec + "': ") as err:
        resolve_weights(spec, served.url, tmp_path)
    assert message.format(url=served.url) in str(err.value)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = main(["evaluate", "--model", spec, "--tracking-uri", served.url])
    assert status == 2 and stderr.getvalue() == f"error: {err.value}\n"


@pytest.mark.slow
def test_the_champion_moves_only_for_a_better_value_of_the_same_metric_on_the_same_data(served):
    client = MlflowClient(served.url)
    model, run = model_id(served.first), served.first.outcome.parent_run_id

    def register(metric: str, value: float, data: str) -> str:
        measured = registry.Measured(metric, "max", value, data)
        return registry.register(client, "by-hand", model, run, measured)[1]

    assert register("val_auc_mean", 0.8, "a").endswith("champion is now version 1 (there was none)")
    assert register("val_auc_mean", 0.9, "b").endswith(
        "champion stays version 1: it was measured on other validation data (fingerprint a, this search b), "
        "which does not compare")
    assert register("val_accuracy", 0.99, "a").endswith(
        "champion stays version 1: it was measured by val_auc_mean (max), this search by val_accuracy (max), "
        "which do not compare")
    assert register("val_auc_mean", 0.8, "a").endswith("(val_auc_mean 0.8000 does not beat its 0.8000; "
                                                       "higher is better)")
    assert register("val_auc_mean", 0.85, "a").endswith("champion moves from version 1 to 5 "
                                                        "(val_auc_mean 0.8500 beats 0.8000)")
    assert client.get_registered_model("by-hand").aliases == {"champion": "5"}


def test_the_data_fingerprint_follows_the_validation_slices_and_their_preparation(tiny_config, tiny_rsna):
    def data(**change):
        return tiny_config(data={"cache_dir": str(shared_cache(tiny_rsna)), **change}).data

    cache = prepare_cache(data())
    fingerprint = data_fingerprint(cache, data())
    assert data_fingerprint(cache, data(augment=True, workers=1)) == fingerprint  # not the val data
    for change in ({"split_seed": 1}, {"train_fraction": 0.5}, {"context": 1}):
        assert data_fingerprint(cache, data(**change)) != fingerprint, change


def test_a_registered_model_name_that_breaks_models_uris_is_refused(tiny_rsna, tmp_path):
    from ich_tune.errors import ConfigError

    space = write_space(tmp_path, tiny_rsna, registered_model="team/ich")
    with pytest.raises(ConfigError, match=r"space.yaml:\d+: key 'registered_model': 'team/ich' cannot name a "
                                          "registered model"):
        load_search(space)
    assert load_search(space, ["registered_model=''"]).config.registered_model == ""


def test_run_flags_name_the_registered_model_or_none(tiny_rsna, tmp_path):
    from ich_tune.cli import build_parser

    space = write_space(tmp_path, tiny_rsna, registered_model="from-file")

    def registered(*flags: str) -> str | None:
        args = build_parser().parse_args(["run", str(space), *flags])
        return load_search(args.file, args.overrides).config.registered_model

    assert registered() == "from-file"
    assert registered("--registered-model", "ich-demo", "--set", "model.dropout=0.2") == "ich-demo"
    assert registered("--no-register") == ""
    assert registered("--registered-model", "") == ""


def test_a_registry_that_fails_after_registering_keeps_the_version_and_the_champion():
    class Client:  # registers, then cannot reach the server to read or move the alias
        def create_registered_model(self, name):
            pass

        def create_model_version(self, name, source, **_):
            return type("Version", (), {"version": "3"})()

        def get_registered_model(self, name):
            raise MlflowException("API request to http://mlflow:5000 failed: connection refused")

    measured = registry.Measured("val_auc_mean", "max", 0.9, "a")
    uri, said = registry.register(Client(), "by-hand", "m-1", "run", measured)
    assert uri == "models:/by-hand/3"
    assert said == ("registered by-hand version 3 (val_auc_mean 0.9000); champion unchanged "
                    "(API request to http://mlflow:5000 failed: connection refused)")
