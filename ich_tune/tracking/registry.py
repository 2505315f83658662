"""A search's best model as a new version of a registered model, and the alias `champion`.

Every finished search adds a version, tagged with what it was measured by: the metric, its mode,
the best value and the validation data's fingerprint. The alias moves only when the new version
beats the champion on the same metric and mode and the same validation data; values measured on
different data or by another metric are not comparable, so the champion then stays and the
message says why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ich_tune.tracking.tags import TAG_DATA, TAG_METRIC, TAG_MODE, TAG_VALUE

CHAMPION = "champion"


@dataclass
class Measured:
    """What a version's value means: comparable only with the same metric, mode and data."""

    metric: str
    mode: str
    value: float
    data: str

    def tags(self) -> dict[str, str]:
        return {TAG_METRIC: self.metric, TAG_MODE: self.mode, TAG_VALUE: repr(self.value),
                TAG_DATA: self.data}


def register(client: MlflowClient, name: str, model_id: str, run_id: str,
             measured: Measured) -> tuple[str | None, str]:
    """Register models:/<model_id> as a new version of `name` and move the champion alias if it has
    earned it. Returns the version's URI (None where the store cannot register models) and one line
    saying what happened. A SQL store finds the logged model through MLflow's global tracking URI,
    which must be the client's (log_search_result sets it)."""
    try:
        try:
            client.create_registered_model(name)
        except MlflowException as err:
            if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        version = client.create_model_version(name, f"models:/{model_id}", run_id=run_id, model_id=model_id,
                                              tags=measured.tags())
    except (MlflowException, OSError) as err:  # OSError: requests' connection errors
        return None, f"model registry: not registered ({_reason(err)}); the model stays at models:/{model_id}"
    uri = f"models:/{name}/{version.version}"
    said = f"registered {name} version {version.version} ({measured.metric} {measured.value:.4f})"
    try:
        return uri, f"{said}; {promote(client, name, version.version, measured)}"
    except (MlflowException, OSError) as err:  # the version exists; only the alias is left as it was
        return uri, f"{said}; {CHAMPION} unchanged ({_reason(err)})"


def promote(client: MlflowClient, name: str, version: str, new: Measured) -> str:
    """Point `champion` at `version` if it beats the current champion; say what was done and why."""
    aliases = client.get_registered_model(name).aliases
    if CHAMPION not in aliases:
        client.set_registered_model_alias(name, CHAMPION, version)
        return f"{CHAMPION} is now version {version} (there was none)"
    current = client.get_model_version(name, aliases[CHAMPION])
    old = _measured(current.tags)
    if old is None:
        return (f"{CHAMPION} stays version {current.version}: it carries no {TAG_METRIC}/{TAG_VALUE} tags, "
                "so it cannot be compared; move the alias by hand if the new version should replace it")
    if (old.metric, old.mode) != (new.metric, new.mode):
        return (f"{CHAMPION} stays version {current.version}: it was measured by {old.metric} ({old.mode}), "
                f"this search by {new.metric} ({new.mode}), which do not compare")
    if old.data != new.data:
        return (f"{CHAMPION} stays version {current.version}: it was measured on other validation data "
                f"(fingerprint {old.data}, this search {new.data}), which does not compare")
    if beats(new.value, old.value, new.mode):
        client.set_registered_model_alias(name, CHAMPION, version)
        return (f"{CHAMPION} moves from version {current.version} to {version} ({new.metric} "
                f"{new.value:.4f} beats {old.value:.4f})")
    better = "higher" if new.mode == "max" else "lower"
    return (f"{CHAMPION} stays version {current.version} ({new.metric} {new.value:.4f} does not beat its "
            f"{old.value:.4f}; {better} is better)")


def beats(new: float, old: float, mode: str) -> bool:
    """Strictly better: a tie keeps the champion."""
    if math.isnan(new):
        return False
    return math.isnan(old) or (new > old if mode == "max" else new < old)


def _reason(err: Exception) -> str:
    """The first line of an error, or its type where it says nothing."""
    text = str(getattr(err, "message", err)).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _measured(tags: dict[str, str]) -> Measured | None:
    try:
        return Measured(tags[TAG_METRIC], tags[TAG_MODE], float(tags[TAG_VALUE]), tags[TAG_DATA])
    except (KeyError, ValueError):
        return None
