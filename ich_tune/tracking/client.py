"""The MLflow store of a search: which URI, the experiment of a search name, its parent run, and the
client every verb uses (a missing SQLite file or an MLflow failure is one message).

MLflow is imported inside the two functions that make clients or catch its errors: `predict` with a
local weights file imports this module and should not pay MLflow's start-up (about a second).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ich_tune.config.schema import SearchConfig
from ich_tune.errors import UserError
from ich_tune.tracking.tags import TAG_EXPERIMENT_KIND, TAG_PARENT, TAG_SEARCH_DIR, TRAINING_KIND

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

def default_tracking_uri(folder: Path) -> str:
    """SQLite in the driver's local folder: the embedded store for one machine."""
    return f"sqlite:///{(folder / 'mlflow.db').resolve()}"


def is_server(tracking_uri: str) -> bool:
    """An `mlflow server` (http or https): it stores the artifacts, and any machine that reaches it
    can fetch them."""
    return tracking_uri.startswith(("http://", "https://"))


def ui_hint(tracking_uri: str, experiment: str | None = None) -> str:
    """How to look at the runs: the server's page, or `mlflow ui` over a local store."""
    if is_server(tracking_uri):
        page = f"/#/experiments/{experiment}" if experiment else ""
        return f"open {tracking_uri.rstrip('/')}{page}"
    return f"mlflow ui --backend-store-uri {tracking_uri}"


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


def default_search_store() -> str:
    """The SQLite store a search writes by default (`runs/mlflow.db` under the working directory)."""
    return default_tracking_uri(Path(SearchConfig().storage))


def mlflow_client(tracking_uri: str | None) -> tuple[MlflowClient, str]:
    """An MlflowClient and its URI; refuses a SQLite path that does not exist (MLflow would create it)."""
    # only here: predict with a local weights file skips MLflow's start-up
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # bars for a file or two are noise
    uri = tracking_uri or default_search_store()
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///"))
        if not database.is_file():
            raise UserError(f"no MLflow database at {database}: run a search first (`python -m ich_tune "
                            "run ...`) from this folder, or pass --tracking-uri.")
    return MlflowClient(uri), uri


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
