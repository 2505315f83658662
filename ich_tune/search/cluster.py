"""Starting a local Ray, or joining a running cluster whose nodes may not have ich_tune installed.

Joining (`--address`, or `RAY_ADDRESS`, which `ray job submit` sets for its driver) ships the ich_tune
package to every worker through the job's runtime environment, so a node needs only the
dependencies. A cluster with token authentication refuses a driver without its token; Ray says so
in a log line and a `ConnectionError`, which becomes one message here.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import ray
from ray.exceptions import AuthenticationError

import ich_tune
from ich_tune import PRIVATE_ENV
from ich_tune.errors import UserError

log = logging.getLogger(__name__)

DASHBOARD_PORT = int(os.environ.get("ICH_TUNE_DASHBOARD_PORT", 8265))
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray for the driver of a submitted job
TOKEN_FILE = Path.home() / ".ray" / "auth_token"


def start_ray(address: str | None = None, dashboard_port: int | None = None,
              num_gpus: int | None = None, log_to_driver: bool = True) -> None:
    """Join `address` (else $RAY_ADDRESS), or start a local Ray with its dashboard on 127.0.0.1 at
    `dashboard_port` (default DASHBOARD_PORT) declaring `num_gpus` logical GPUs, and say how to open the
    dashboard. `log_to_driver`: Ray prints what its workers print on this console.

    Workers get the driver's telemetry settings (off unless the user turned them on), also on a
    cluster whose nodes were started without them.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env = {name: os.environ[name] for name in PRIVATE_ENV if name in os.environ}
    if address:
        kwargs = {"address": address, "runtime_env": joining_runtime_env(env)}
    else:
        kwargs = {"include_dashboard": True, "dashboard_host": "127.0.0.1",
                  "dashboard_port": dashboard_port or DASHBOARD_PORT, "num_gpus": num_gpus,
                  "runtime_env": {"env_vars": env}}
    try:
        context = ray.init(**kwargs, log_to_driver=log_to_driver)
    except (AuthenticationError, ConnectionError) as err:
        if refused_token(err):
            raise UserError(token_message(address or "the local cluster", err)) from None
        if address:
            raise UserError(f"{err}: check --address (or RAY_ADDRESS), that the cluster's head is up "
                            "(`ray status` on it), and that this machine is a node of that cluster "
                            "(ray start --address ...), or submit with ray job submit.") from None
        raise
    url = context.dashboard_url
    if url:
        log.info(f"Ray dashboard: http://{url} ({how_to_open()})")


def joining_runtime_env(env: dict[str, str]) -> dict:
    """The ich_tune package and the telemetry settings for every worker of a cluster.

    Inside a submitted job Ray merges this with the job's own runtime environment and refuses a key
    both set, so what the job sets already is left to it.
    """
    job = json.loads(os.environ.get(JOB_CONFIG_ENV, "{}")).get("runtime_env") or {}
    runtime_env: dict = {}
    if "py_modules" not in job:
        runtime_env["py_modules"] = [str(Path(ich_tune.__file__).parent)]
    own = {name: value for name, value in env.items() if name not in job.get("env_vars", {})}
    if own:
        runtime_env["env_vars"] = own
    return runtime_env


def refused_token(err: BaseException | None) -> bool:
    """Whether Ray failed for want of the right token: an AuthenticationError when token mode is on and
    no token is found; a ConnectionError whose cause names InvalidAuthToken when the cluster refuses
    the token sent (a wrong one, or none because this process has token mode off)."""
    while err is not None:
        if isinstance(err, AuthenticationError) or "InvalidAuthToken" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def token_message(address: str, err: BaseException) -> str:
    mode = os.environ.get("RAY_AUTH_MODE", "unset")
    found = "no token was found" if isinstance(err, AuthenticationError) else "it refused the token sent"
    return (f"Ray at {address} requires its authentication token and {found} (RAY_AUTH_MODE is {mode}). "
            f"Set RAY_AUTH_MODE=token and give the cluster's token in RAY_AUTH_TOKEN, or in the file "
            f"{TOKEN_FILE} (or a file named by RAY_AUTH_TOKEN_PATH); `ray get-auth-token` on the head "
            "node prints it.")


def how_to_open() -> str:
    """How to get past the dashboard's token prompt."""
    if os.environ.get("RAY_AUTH_MODE") == "disabled":
        return "no token needed (RAY_AUTH_MODE=disabled)"
    if os.environ.get("RAY_AUTH_TOKEN"):
        return ("it asks for a token: paste the value of $RAY_AUTH_TOKEN; for the REST API send "
                "`Authorization: Bearer $RAY_AUTH_TOKEN`")
    if TOKEN_FILE.exists():
        return (f"it asks for a token: paste the contents of {TOKEN_FILE} (`cat {TOKEN_FILE}`); for the "
                f"REST API send `Authorization: Bearer $(cat {TOKEN_FILE})`")
    mode = os.environ.get("RAY_AUTH_MODE", "unset")
    return (f"no token here (RAY_AUTH_MODE {mode}, no RAY_AUTH_TOKEN, no {TOKEN_FILE}); if it asks for one, "
            "`ray get-auth-token` on the head node prints it")
