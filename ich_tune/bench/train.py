"""Steps/s of the real training loop against a bare loop of the same model (and GPU throughput).

The real loop is `ich_tune.training.loop.train` itself, unchanged: it gathers batches from the memory-mapped
cache, steps the schedule and logs. It is timed between two of its own progress lines, so set-up and
the final validation stay outside the measurement. The bare loop runs the same model, loss and
optimizer on one batch of tensors held in memory: what the loop would cost with free data.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from ich_tune.training.device import Placement


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", type=Path, default=Path("experiments/demo.yaml"))
    parser.add_argument("--steps", type=int, default=150, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="real and bare runs, interleaved")
    parser.add_argument("--json", type=Path, help="also write the figures here")


def run(args: argparse.Namespace) -> int:
    # loaded when the bench runs, not when the CLI builds its parser (see ich_tune.bench)
    import torch

    from ich_tune.data.cache import open_cache
    from ich_tune.data.prepare import prepare_cache
    from ich_tune.experiment import load_experiment

    config, _ = load_experiment(args.experiment)
    warmup = 10
    config.train.max_steps = warmup + args.steps
    config.train.val_interval = 10**9  # validation off (train still validates once, after the last step)
    config.train.val_batches = 1
    config.logging.print_interval = warmup
    config.logging.tensorboard = False
    config.logging.plot_interval = 10**9
    cache = prepare_cache(config.data)
    threads = torch.get_num_threads()
    real, bare = [], []
    for _ in range(args.repeats):
        real.append(real_loop_rate(config, cache, warmup))
        bare.append(bare_loop_rate(config, cache, args.steps))
    figures = {
        "machine": f"{os.cpu_count()} CPU cores, {threads} torch threads"
                   + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
        "experiment": str(args.experiment), "batch_size": config.train.batch_size,
        "input": list(open_cache(cache).images.shape[1:]), "real_steps_per_s": max(real),
        "bare_steps_per_s": max(bare),
        "ratio": max(real) / max(bare), "target_ratio": 0.95,
    }
    print(f"bench train: {figures['experiment']}, batch {figures['batch_size']}, input {figures['input']}, "
          f"{figures['machine']}")
    print(f"  real loop   {figures['real_steps_per_s']:8.2f} steps/s   (best of {args.repeats}: "
          f"{', '.join(f'{r:.2f}' for r in real)})")
    print(f"  bare loop   {figures['bare_steps_per_s']:8.2f} steps/s   (best of {args.repeats}: "
          f"{', '.join(f'{b:.2f}' for b in bare)})")
    verdict = "PASS" if figures["ratio"] >= 0.95 else "FAIL"
    print(f"  ratio       {figures['ratio']:8.3f}   target >= 0.95: {verdict}")
    if torch.cuda.is_available():
        figures["gpu"] = gpu_table()
    else:
        print("  no CUDA device: the GPU figures (256x256 batch 12, 512x512 batch 4, AMP) need one")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


def real_loop_rate(config, cache: Path, warmup: int) -> float:
    """Steps/s of `train` between its progress lines at step `warmup` and at the last step."""
    # loaded when the bench runs, not when the CLI builds its parser (see ich_tune.bench)
    from ich_tune.training import loop

    stamps: dict[int, float] = {}

    def stamp(record: logging.LogRecord) -> bool:
        """Times each progress line, and keeps the loop's lines from printing between the figures."""
        line = record.getMessage()
        if line.startswith("step") and " loss " in line:
            stamps[int(line.split()[1].split("/")[0])] = time.perf_counter()
        return False

    loop.log.addFilter(stamp)
    try:
        with tempfile.TemporaryDirectory() as out:
            loop.train(config, cache, Path(out))
    finally:
        loop.log.removeFilter(stamp)
    last = max(stamps)
    return (last - warmup) / (stamps[last] - stamps[warmup])


def bare_loop_rate(config, cache: Path, steps: int) -> float:
    """Steps/s of the loop's optimizer step on one batch already in memory."""
    # loaded when the bench runs, not when the CLI builds its parser (see ich_tune.bench)
    import numpy as np

    from ich_tune.data.cache import open_cache
    from ich_tune.data.loader import gather, to_float
    from ich_tune.data.neighbours import with_neighbours

    stacked = with_neighbours(open_cache(cache), config.data.context)  # the batch training would see
    placement, step = loop_step(config)
    batch = placement.images(gather(stacked, np.arange(config.train.batch_size))[0])
    for index in range(steps + 10):
        if index == 10:
            start = time.perf_counter()
        step(to_float(batch)).item()
    return steps / (time.perf_counter() - start)


def loop_step(config) -> tuple[Placement, Callable[[torch.Tensor], torch.Tensor]]:
    """Where images go, and the training loop's optimizer step for `config` (its model, fresh, loss,
    optimizer, precision and gradient clipping) as a function of a batch of train.batch_size images
    on the device, all labelled negative, that returns the loss."""
    # loaded when the bench runs, not when the CLI builds its parser (see ich_tune.bench)
    import torch

    from ich_tune.data.neighbours import input_channels
    from ich_tune.models import build_model
    from ich_tune.training.device import place
    from ich_tune.training.optim import make_loss, make_optimizer
    from ich_tune.training.step import optimizer_step

    placement = place(config.train)
    model = placement.model(build_model(config.model, in_channels=input_channels(config.data)))
    loss_fn = make_loss(config.loss.objective)
    optimizer = make_optimizer(config.optimizer, model.parameters())
    scaler = placement.grad_scaler()
    labels = torch.zeros(config.train.batch_size, config.model.num_classes, device=placement.device)
    model.train()

    def step(images: torch.Tensor) -> torch.Tensor:
        return optimizer_step(model, loss_fn, optimizer, placement, scaler, images, labels,
                              config.optimizer.grad_clip)

    return placement, step


def gpu_table() -> list[dict]:
    """Samples/s and peak memory of the halfres model at the original's two input sizes, AMP on/off."""
    # loaded when the bench runs, not when the CLI builds its parser (see ich_tune.bench)
    import torch

    rows = []
    print(f"  GPU: {torch.cuda.get_device_name()}, halfres model (hidden_dims 256,192,128,64), MSE, Adam")
    print(f"  {'input':>9} {'batch':>5} {'amp':>5} {'samples/s':>10} {'peak MiB':>9}")
    for size, batch_size in ((256, 12), (512, 4)):
        for amp in (None, torch.bfloat16):
            torch.cuda.reset_peak_memory_stats()
            start, end = halfres_steps(size, batch_size, amp, steps=50)
            rate = 50 * batch_size / (end - start)
            peak = torch.cuda.max_memory_allocated() / 2**20
            name = "bf16" if amp else "off"
            print(f"  {size:>4}x{size:<4} {batch_size:>5} {name:>5} {rate:>10.1f} {peak:>9.0f}")
            rows.append({"size": size, "batch": batch_size, "amp": name, "samples_per_s": rate,
                         "peak_mib": peak})
    return rows


def halfres_steps(size: int, batch_size: int, amp, steps: int, warmup: int = 10) -> tuple[float, float]:
    """time.time() before and after `steps` optimizer steps (after `warmup` more) of the halfres model
    on the GPU: random input at size x size, channels-last, autocast to `amp` (None: float32), MSE, Adam.
    Wall-clock times, so that steps in several processes can be put on one time line."""
    # loaded when the bench runs, not when the CLI builds its parser (see ich_tune.bench)
    import torch

    from ich_tune.models.resnet import ResNetClassifier2d
    from ich_tune.training.device import Placement
    from ich_tune.training.optim import make_loss
    from ich_tune.training.step import optimizer_step

    placement = Placement(torch.device("cuda"), amp, channels_last=True)
    model = placement.model(ResNetClassifier2d(1, hidden_dims=(256, 192, 128, 64), dropout=0.15))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn, scaler = make_loss("mse"), placement.grad_scaler()
    images = placement.images(torch.randn(batch_size, 1, size, size, device="cuda"))
    labels = torch.zeros(batch_size, 6, device="cuda")
    for step in range(warmup + steps):
        if step == warmup:
            torch.cuda.synchronize()
            start = time.time()
        optimizer_step(model, loss_fn, optimizer, placement, scaler, images, labels)
    torch.cuda.synchronize()
    return start, time.time()
