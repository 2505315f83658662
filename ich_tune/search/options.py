"""What a `run` asks of the search driver besides the search file: its command-line flags."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class RunOptions:
    data_root: Path | None = None
    address: str | None = None  # join an existing Ray cluster instead of starting one
    resume: bool = False
    tracking_uri: str | None = None
    name: str | None = None  # the run folder under <storage>/<search name>/; default a timestamp
    num_gpus: int | None = None  # logical GPUs declared when starting a local Ray
    dashboard_port: int | None = None  # default cluster.DASHBOARD_PORT
    local_dir: Path | None = None  # the driver's own files when storage is a URI; default ~/.cache/ich_tune
    rescan: bool = False  # every node checks every file of each data variant rather than trusting its caches
    verbose: bool = False  # Ray's tables and log lines, MLflow's, and the trials' output on the console
