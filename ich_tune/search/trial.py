"""The trial function: what one Ray worker runs for one trial, the training loop with Tune's
`report` plugged in. Everything the worker prints goes to trial.log in its trial folder."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from ray import tune
from ray.tune.utils import unflattened_lookup

from ich_tune.experiment import build_experiment
from ich_tune.logs import to_stdout
from ich_tune.search.nodes import DataOnNodes
from ich_tune.search.worker_output import output_to
from ich_tune.training.loop import TrainingFailed, train, write_hparams
from ich_tune.trials import ENDED_KEY, MESSAGE_KEY, NODE_KEY, TRIAL_LOG, one_line, worst

log = logging.getLogger(__name__)

PID_FILE = "worker.pid"  # in each trial's folder: the process that trains it, on its node


@dataclass
class TrialSettings:
    """What every trial needs besides its config; shipped once through Ray's object store."""

    data: DataOnNodes  # each node's caches, prepared before its first trial
    randomize_seed: bool
    threads: int
    gpu_fraction: float
    metric: str
    mode: str
    dimensions: list[str]  # the searched keys, dotted
    echo: bool  # run --verbose: the worker's output also goes where Ray forwards it to the driver


def run_trial(config: dict, settings: TrialSettings) -> None:
    """One trial, its output appended to trial.log in its folder (a restart adds to it)."""
    context = tune.get_context()
    trial_dir = Path(context.get_trial_dir())
    with output_to(trial_dir / TRIAL_LOG, echo=settings.echo):
        to_stdout()  # a worker process of its own: its lines go to its stdout
        log.info(f"--- trial {context.get_trial_id()}: worker pid {os.getpid()}, "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
        _train_trial(config, settings, context, trial_dir)


def _train_trial(config: dict, settings: TrialSettings, context, trial_dir: Path) -> None:
    """The training loop, reporting each validation and checkpoint to Ray Tune."""
    cfg = build_experiment(config, {})
    (trial_dir / PID_FILE).write_text(f"{os.getpid()}\n")
    if settings.randomize_seed:  # stable across retries of the same trial
        cfg.seed = zlib.crc32(context.get_trial_id().encode())
    if torch.cuda.is_available() and 0 < settings.gpu_fraction < 1:
        cfg.train.cuda_memory_fraction = cfg.train.cuda_memory_fraction or settings.gpu_fraction
    cache = settings.data.cache_for(cfg.data)  # waits for this node's preparation; never builds

    node_id = ray.get_runtime_context().get_node_id()  # which machine trained it, in every result

    def report(metrics: dict, folder: Path | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(str(folder)) if folder else None
        tune.report({**metrics, "seed": cfg.seed, NODE_KEY: node_id}, checkpoint=checkpoint)

    checkpoint = tune.get_checkpoint()
    if cfg.logging.tensorboard and checkpoint is None:  # once, not again on a restart
        searched = {path: unflattened_lookup(path, config, delimiter=".", default=None)
                    for path in settings.dimensions}
        write_hparams(trial_dir / "tensorboard", searched)
    # checkpoints are staged outside the trial folder, which Ray syncs to storage as it pleases: a folder
    # deleted after tune.report has copied it must not be half-synced
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as resume_dir, \
            tempfile.TemporaryDirectory(prefix="ich_tune-checkpoints-") as staging:
        try:
            train(cfg, cache, Path(staging), report=report, threads=settings.threads,
                  resume_from=Path(resume_dir) if resume_dir else None,
                  tensorboard_dir=trial_dir / "tensorboard")
        except TrainingFailed as err:  # NaN loss, out of memory: a retry would fail the same way
            log.info(f"trial ended ({err.status}): {err}")
            tune.report({"step": err.step or 0, settings.metric: worst(settings.mode), ENDED_KEY: err.status,
                         MESSAGE_KEY: one_line(str(err)), "seed": cfg.seed, NODE_KEY: node_id})
