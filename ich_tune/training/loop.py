"""The training loop of one run: a step budget, periodic validation, checkpoints, a report hook.

It knows nothing of Ray: inside a trial, `report` is Ray Tune's; in `ich_tune train` it is None and
progress goes to the log. A checkpoint holds everything a resumed run needs to continue exactly.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tensorboardX import SummaryWriter
from tensorboardX.summary import hparams

from ich_tune.config.schema import ExperimentConfig
from ich_tune.data.loader import TrainBatches, to_float, validation_batches
from ich_tune.data.neighbours import input_channels
from ich_tune.data.prepare import Splits, load_splits
from ich_tune.errors import UserError
from ich_tune.evaluation.metrics import compute_metrics
from ich_tune.evaluation.plots import example_grid, png_to_array
from ich_tune.models import build_model, count_parameters
from ich_tune.training.checkpoint import (
    CHECKPOINT_FILE,
    EXAMPLES_FILE,
    VALIDATION_FILE,
    load_checkpoint,
    load_state,
    load_weights,
    save_checkpoint,
)
from ich_tune.training.device import Placement, place
from ich_tune.training.inference import predict_batches
from ich_tune.training.optim import make_loss, make_lr_schedule, make_optimizer
from ich_tune.training.step import NonFiniteLoss, optimizer_step
from ich_tune.trials import DIVERGED, ERROR

log = logging.getLogger(__name__)

HPARAM_METRICS = ("val/accuracy", "val/auc_any", "val/auc_mean", "val/log_loss")  # scalars written below
Report = Callable[[dict, Path | None], None]  # (metrics, folder holding a checkpoint or None)


class TrainingFailed(UserError):
    """Training cannot go on, and would fail the same way if retried; the message says what to change."""

    status = ERROR

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step  # where it happened, when known


class LossNotFinite(TrainingFailed):
    """The loss became NaN or infinite."""

    status = DIVERGED


class OutOfMemory(TrainingFailed):
    """The batch did not fit in the memory given to this run."""


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or the CPU allocator's RuntimeError."""
    return isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error))


def out_of_memory(cfg: ExperimentConfig) -> OutOfMemory:
    """The message names the sizes involved and what to lower."""
    size, channels = cfg.data.size, input_channels(cfg.data)
    share = cfg.train.cuda_memory_fraction
    return OutOfMemory(
        f"out of memory: batch size {cfg.train.batch_size}, input {channels}x{size}x{size}, "
        f"{f'GPU share {share:g}' if share else 'no GPU share set'}. Lower train.batch_size (or the input "
        "size, data.lod, or the model, model.hidden_dims), or give each trial a larger share "
        "(resources.gpu).")


@dataclass
class Outcome:
    steps: int
    metrics: dict  # the last validation, "val_" keys
    history: list[dict]  # every validation
    model: torch.nn.Module


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def total_steps(cfg: ExperimentConfig, batches_per_epoch: int) -> int:
    return cfg.train.max_steps or max(1, math.ceil(cfg.train.max_epochs * batches_per_epoch))


def train(cfg: ExperimentConfig, cache_path: Path, out_dir: Path, report: Report | None = None,
          resume_from: Path | None = None, threads: int | None = None,
          tensorboard_dir: Path | None = None) -> Outcome:
    """Train one model; validate every `train.val_interval` steps and at the end. Running out of memory
    ends it with one message that says what to lower."""
    try:
        return _train(cfg, cache_path, out_dir, report, resume_from, threads, tensorboard_dir)
    except Exception as err:
        if is_out_of_memory(err):
            raise out_of_memory(cfg) from None
        raise


@dataclass
class Training:
    """What training changes step by step, and what a checkpoint must hold to continue it exactly."""

    cfg: ExperimentConfig
    splits: Splits
    placement: Placement
    model: torch.nn.Module
    batches: TrainBatches
    loss_fn: Callable
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    steps: int  # the budget

    def state(self, step: int, history: list[dict]) -> dict:
        # the learning-rate schedule is saved as "scheduler", the key every checkpoint has had
        return {"step": step, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.lr_schedule.state_dict(), "scaler": self.scaler.state_dict(),
                "sampler": self.batches.state(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
                "history": history}

    def resume(self, folder: Path) -> tuple[int, list[dict]]:
        """Model, optimizer, schedule, sampler and RNG as saved in `folder`; the step and history."""
        saved = load_checkpoint(folder / CHECKPOINT_FILE)
        load_state(self.model, saved)
        state = saved.training
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.batches.load_state(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        if self.placement.device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"])
        log.info(f"resumed from {folder} at step {state['step']}")
        return state["step"], state["history"]


def set_up(cfg: ExperimentConfig, cache_path: Path, threads: int | None, warm_start: bool) -> Training:
    """Threads, seeds, device, data, the network (warm-started from model.init_from), optimizer."""
    torch.set_num_threads(cfg.train.threads or threads or len(os.sched_getaffinity(0)))
    seed_everything(cfg.seed, cfg.train.deterministic)
    placement = place(cfg.train)
    splits = load_splits(cache_path, cfg.data)
    model = build_model(cfg.model, in_channels=input_channels(cfg.data))
    if cfg.model.init_from and warm_start:
        loaded = load_weights(model, Path(cfg.model.init_from).expanduser())
        log.info(f"model: {loaded} tensors loaded from {cfg.model.init_from}")
    placement.model(model)
    log.info(f"model: {cfg.model.name}, {count_parameters(model):,} parameters, "
             f"input {input_channels(cfg.data)}x{cfg.data.size}x{cfg.data.size}, device {placement.device}")
    batches = TrainBatches(splits.cache, splits.train, cfg.train.batch_size, seed=cfg.seed,
                           balanced=cfg.data.balanced, augment=cfg.data.augment)
    steps = total_steps(cfg, batches.batches_per_epoch)
    optimizer = make_optimizer(cfg.optimizer, model.parameters())
    return Training(cfg, splits, placement, model, batches, make_loss(cfg.loss.objective), optimizer,
                    make_lr_schedule(optimizer, cfg.schedule, steps),
                    placement.grad_scaler(), steps)


def train_step(training: Training, step: int) -> torch.Tensor:
    """One optimizer step on the next batch; the loss stays on the device (no GPU sync every step)."""
    images, labels = next(training.batches)
    images = to_float(training.placement.images(images))
    labels = labels.to(training.placement.device, non_blocking=True)
    try:
        loss = optimizer_step(training.model, training.loss_fn, training.optimizer, training.placement,
                              training.scaler, images, labels, training.cfg.optimizer.grad_clip)
    except NonFiniteLoss as err:
        raise LossNotFinite(f"step {step}: {err}. Lower optimizer.lr (now {training.cfg.optimizer.lr:g}), "
                            "set optimizer.grad_clip, or try amp: off.", step) from None
    training.lr_schedule.step()
    return loss


class LossWindow:
    """The mean training loss and the speed since the last print."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.total, self.count, self.started = 0.0, 0, time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss  # a tensor on the device until printed
        self.count += 1

    def print(self, training: Training, step: int, writer: SummaryWriter | None) -> None:
        loss, lr = float(self.total) / self.count, training.lr_schedule.get_last_lr()[0]
        rate = self.count * training.cfg.train.batch_size / (time.perf_counter() - self.started)
        log.info(f"step {step:>6}/{training.steps}  loss {loss:.4f}  lr {lr:.2e}  {rate:,.0f} samples/s")
        if writer:
            writer.add_scalar("train/loss", loss, step)
            writer.add_scalar("train/lr", lr, step)
            writer.add_scalar("train/samples_per_s", rate, step)
        self.reset()


def validate(training: Training, step: int, writer: SummaryWriter | None
             ) -> tuple[dict, np.ndarray, np.ndarray]:
    """Metrics over the validation split (logged, and written to TensorBoard), probabilities, labels."""
    scores, probs, labels = evaluate(training.model, training.splits, training.cfg, training.placement)
    metrics = {"step": step, "epoch": step / training.batches.batches_per_epoch, **scores}
    log.info(f"step {step:>6}/{training.steps}  val accuracy {metrics['val_accuracy']:.4f} "
             f"(all-negative {metrics['val_accuracy_baseline']:.4f})  "
             f"AUC any {metrics['val_auc_any']:.4f}  log loss {metrics['val_log_loss']:.4f}")
    if writer:
        for key, value in metrics.items():
            if key.startswith("val_") and math.isfinite(value):
                writer.add_scalar(f"val/{key[4:]}", value, step)
        writer.flush()
    return metrics, probs, labels


def save_step(training: Training, out_dir: Path, step: int, history: list[dict], probs: np.ndarray,
              labels: np.ndarray, writer: SummaryWriter | None) -> Path:
    """A checkpoint folder: checkpoint.pt, the validation's probabilities and, at the plot interval
    and at the end, the example grid."""
    folder = out_dir / f"checkpoint_{step:07d}"
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(folder / CHECKPOINT_FILE, training.cfg, training.model,
                    training=training.state(step, history))
    np.savez(folder / VALIDATION_FILE, probs=probs, labels=labels, indices=training.splits.val[:len(probs)])
    settings = training.cfg.logging
    if step % settings.plot_interval == 0 or step == training.steps:
        png = example_grid(training.splits.cache.rows(training.splits.val), labels, probs,
                           settings.plot_examples, settings.plot_baseline, seed=training.cfg.seed)
        (folder / EXAMPLES_FILE).write_bytes(png)
        if writer:
            writer.add_image("examples", png_to_array(png), step, dataformats="HWC")
    return folder


def _train(cfg: ExperimentConfig, cache_path: Path, out_dir: Path, report: Report | None,
           resume_from: Path | None, threads: int | None, tensorboard_dir: Path | None) -> Outcome:
    training = set_up(cfg, cache_path, threads, warm_start=resume_from is None)
    start, history = training.resume(resume_from) if resume_from else (0, [])
    writer = _tensorboard(tensorboard_dir or out_dir, cfg.logging.tensorboard)
    training.model.train()
    window, metrics, kept = LossWindow(), (history[-1] if history else {}), None
    for step in range(start + 1, training.steps + 1):
        window.add(train_step(training, step))
        if step % cfg.logging.print_interval == 0 or step == training.steps:
            window.print(training, step, writer)
        if step % cfg.train.val_interval and step != training.steps:
            continue
        metrics, probs, labels = validate(training, step, writer)
        history.append(metrics)
        folder = save_step(training, out_dir, step, history, probs, labels, writer)
        if report is not None:
            report(metrics, folder)
            _discard(folder)  # the reporter has copied it to its storage
        else:
            _discard(kept)  # a local run keeps only its latest checkpoint
            kept = folder
    if writer:
        writer.close()
    return Outcome(steps=training.steps, metrics=metrics, history=history, model=training.model)


@torch.no_grad()
def evaluate(model: torch.nn.Module, splits: Splits, cfg: ExperimentConfig, placement: Placement
             ) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Validation metrics ("val_" keys), probabilities and labels over the fixed validation order."""
    probs, labels = predict_batches(model, validation_batches(
        splits.cache, splits.val, cfg.train.batch_size, cfg.train.val_batches), placement)
    return {f"val_{k}": float(v) for k, v in compute_metrics(probs, labels).items()}, probs, labels


def _discard(folder: Path | None) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def write_hparams(folder: Path, values: dict[str, Any]) -> None:
    """A trial's searched values for TensorBoard's HParams dashboard. Its metric columns are the
    validation scalars the training loop writes to the same folder, so stopped trials show too."""
    plain = {k: v if isinstance(v, (bool, str, int, float)) else str(v) for k, v in values.items()}
    experiment, session_start, _ = hparams(plain, dict.fromkeys(HPARAM_METRICS, 0.0))
    # its own file name: an event file is named by the second it was opened in, and the training loop's
    # writer, opened within that second, would otherwise reopen the same file and truncate this one
    with SummaryWriter(str(folder), filename_suffix=".hparams") as writer:
        writer.file_writer.add_summary(experiment)
        writer.file_writer.add_summary(session_start)


def _tensorboard(folder: Path, enabled: bool) -> SummaryWriter | None:
    if not enabled:
        return None
    return SummaryWriter(str(folder), flush_secs=10)

