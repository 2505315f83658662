"""The MLflow store of a search: which URI (MLflow's own order of flag, file and environment), the
experiment of a search name, its parent run, the UI pages to open, and the client every verb uses (a
missing SQLite file or an MLflow failure is one message).

MLflow is imported inside the two functions that make clients or catch its errors: `predict` with a
local weights file imports this module and should not pay MLflow's start-up (about a second).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ich_tune.config.schema import SearchConfig
from ich_tune.errors import UserError
from ich_tune.tracking.tags import (
    TAG_EXPERIMENT_KIND,
    TAG_PARENT,
    TAG_SEARCH_DIR,
    TAG_TRIAL_ID,
    TRAINING_KIND,
)

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

TRACKING_ENV, REGISTRY_ENV = "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"  # MLflow's own variables
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default


@dataclass(frozen=True)
class Stores:
    """The tracking and registry URIs a verb uses, and where each came from, to say so."""

    tracking_uri: str
    tracking_from: str  # "from --tracking-uri", ..., or "default: runs/mlflow.db"
    registry_uri: str
    registry_from: str

    def describe(self) -> str:
        """One line, e.g. "MLflow: sqlite:///.../runs/mlflow.db (default: runs/mlflow.db)"."""
        registry = "" if self.registry_uri == self.tracking_uri else \
            f"; model registry: {self.registry_uri} ({self.registry_from})"
        return f"MLflow: {self.tracking_uri} ({self.tracking_from}){registry}"


def resolve_stores(flag: str | None, search_file: str | None = None, local: Path | None = None) -> Stores:
    """MLflow's conventions: the tracking URI from --tracking-uri, the search file's tracking_uri,
    MLFLOW_TRACKING_URI, else SQLite in the driver's local folder (`local`, default the default
    storage, runs/); the registry from MLFLOW_REGISTRY_URI, else the tracking store."""
    local = local if local is not None else Path(SearchConfig().storage)
    candidates = [(flag, "from --tracking-uri"), (search_file, "from the search file's tracking_uri"),
                  (os.environ.get(TRACKING_ENV), f"from {TRACKING_ENV}"),
                  (default_tracking_uri(local), f"default: {local / 'mlflow.db'}")]
    tracking_uri, tracking_from = next((uri, source) for uri, source in candidates if uri)
    if os.environ.get(REGISTRY_ENV):
        return Stores(tracking_uri, tracking_from, os.environ[REGISTRY_ENV], f"from {REGISTRY_ENV}")
    return Stores(tracking_uri, tracking_from, tracking_uri, "the tracking store")


def default_tracking_uri(folder: Path) -> str:
    """SQLite in the driver's local folder: the embedded store for one machine."""
    return f"sqlite:///{(folder / 'mlflow.db').resolve()}"


def is_server(tracking_uri: str) -> bool:
    """An `mlflow server` (http or https): it stores the artifacts, and any machine that reaches it
    can fetch them."""
    return tracking_uri.startswith(("http://", "https://"))


def ui_hint(tracking_uri: str, experiment: str | None = None) -> str:
    """How to look at the runs: the server's runs table of `experiment`, or `mlflow ui` over a local
    store and the page to open once it has started."""
    if is_server(tracking_uri):
        return f"open {run_page(tracking_uri, experiment) if experiment else tracking_uri.rstrip('/')}"
    command = f"mlflow ui --backend-store-uri {tracking_uri}"
    return f"{command}, then open {run_page(tracking_uri, experiment)}" if experiment else command


def run_page(tracking_uri: str, experiment: str, run_id: str | None = None) -> str:
    """The UI's runs table of an experiment, or one run's page: on the server, or where `mlflow ui`
    serves a local store. MLflow 3's UI opens a bare experiment page on its GenAI overview, so the
    link names the runs tab (its routes /experiments/:id/runs and /experiments/:id/runs/:runUuid)."""
    root = tracking_uri.rstrip("/") if is_server(tracking_uri) else LOCAL_UI
    return f"{root}/#/experiments/{experiment}/runs" + (f"/{run_id}" if run_id else "")


def search_pages(tracking_uri: str, parent_run_id: str, trial_id: str) -> tuple[str, str]:
    """How to compare a search's trials (ui_hint on its runs table), and the page of one trial's run
    (its child run, found by the trial id tag; the runs table where the trial has none)."""
    client, _ = mlflow_client(tracking_uri)
    with tracking_errors():
        experiment = client.get_run(parent_run_id).info.experiment_id
        runs = client.search_runs([experiment], f"tags.`{TAG_PARENT}` = '{parent_run_id}' AND "
                                  f"tags.`{TAG_TRIAL_ID}` = '{trial_id}'", max_results=1)
    page = run_page(tracking_uri, experiment, runs[0].info.run_id if runs else None)
    return ui_hint(tracking_uri, experiment), page


def experiment_id(client: MlflowClient, name: str, artifact_root: Path | None) -> str:
    """The MLflow experiment of a search name, marked as model training so that MLflow 3's UI opens it
    on its runs (not on the GenAI overview). Its artifacts go under `artifact_root` on this machine, or,
    with None, where the tracking server keeps them (`mlflow-artifacts:/...`)."""
    found = client.get_experiment_by_name(name)
    if found is None:
        location = (artifact_root / name).resolve().as_uri() if artifact_root is not None else None
        return client.create_experiment(name, artifact_location=location,
                                        tags={TAG_EXPERIMENT_KIND: TRAINING_KIND})
    if TAG_EXPERIMENT_KIND not in found.tags:
        client.set_experiment_tag(found.experiment_id, TAG_EXPERIMENT_KIND, TRAINING_KIND)
    return found.experiment_id


def parent_run(client: MlflowClient, exp_id: str, search_dir: Path, run_name: str,
               tags: dict[str, str]) -> str:
    """The search's parent run: the existing one for this Ray experiment folder, or a new one."""
    runs = client.search_runs([exp_id], f"tags.`{TAG_SEARCH_DIR}` = '{search_dir}'", max_results=1)
    if runs:
        client.update_run(runs[0].info.run_id, status="RUNNING")
        return runs[0].info.run_id
    run = client.create_run(exp_id, run_name=run_name, tags={TAG_SEARCH_DIR: str(search_dir), **tags})
    return run.info.run_id


def end_unfinished(client: MlflowClient, parent_run_id: str, status: str) -> None:
    """A search that stops before its end: its parent run and its running trials' runs end `status`
    (KILLED on Ctrl-C), not RUNNING forever; --resume sets them running again."""
    for run in child_runs(client, parent_run_id):
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status)
    client.set_terminated(parent_run_id, status)


def child_runs(client: MlflowClient, parent_run_id: str) -> list:
    """The trial runs of a search's parent run."""
    experiment = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([experiment], f"tags.`{TAG_PARENT}` = '{parent_run_id}'", max_results=10000)


def mlflow_client(tracking_uri: str | None) -> tuple[MlflowClient, str]:
    """An MlflowClient of the store `tracking_uri` (--tracking-uri), else MLFLOW_TRACKING_URI, else
    runs/mlflow.db, and its URI; refuses a SQLite path that does not exist (MLflow would create it)."""
    # only here: predict with a local weights file skips MLflow's start-up
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # bars for a file or two are noise
    stores = resolve_stores(tracking_uri)
    uri = stores.tracking_uri
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///"))
        if not database.is_file():
            raise UserError(f"no MLflow database at {database} ({stores.tracking_from}): run a search first "
                            f"(`python -m ich_tune run ...`) from this folder, or pass --tracking-uri or set "
                            f"{TRACKING_ENV}.")
    return MlflowClient(uri, stores.registry_uri), uri


@contextlib.contextmanager
def tracking_errors() -> Iterator[None]:
    """An MLflow failure (bad URI scheme, server unreachable, ...) as one line for the user."""
    # only here: predict with a local weights file skips MLflow's start-up
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as err:
        message = str(err.message).strip() or type(err).__name__
        raise UserError(f"MLflow: {message.splitlines()[0]} (check --tracking-uri)") from None


def search_experiment(client: MlflowClient, uri: str, name: str, missing: str):
    """The MLflow experiment of search `name`; where there is none, a message that starts with
    `missing` and names the searches the store does hold."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        raise UserError(f"{missing} in {uri} (known: {_known_searches(client)}); pass --tracking-uri if it "
                        "was recorded elsewhere.")
    return experiment


def _known_searches(client: MlflowClient) -> str:
    """The experiment names in a tracking store, for messages."""
    names = sorted(e.name for e in client.search_experiments() if e.name != "Default")
    return ", ".join(names) if names else "none yet"


def has_artifact(client: MlflowClient, run_id: str, path: str) -> bool:
    """Whether the run holds the artifact `path` ("trials.csv", "best/config.yaml")."""
    folder = path.rpartition("/")[0] or None
    return any(f.path == path for f in client.list_artifacts(run_id, folder))
