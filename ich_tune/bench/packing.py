"""GPU packing: aggregate samples/s and peak memory with k trials sharing one GPU at gpu = 1/k.

Each of the k trials is a Ray task holding 1/k of the GPU, capping its CUDA memory to that fraction
(as a search trial does) and training the halfres model at 256x256, batch 12. The recommended
fraction is the smallest that still adds at least 5% aggregate throughput without running out of
memory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ich_tune.bench.train import halfres_steps
from ich_tune.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=200, help="timed steps per trial")
    parser.add_argument("--counts", default="1,2,4,8", help="trials per GPU to try")
    parser.add_argument("--json", type=Path, help="also write the figures here")


def train_share(fraction: float, steps: int) -> dict:
    """One trial's share: the halfres loop of `bench train` under a CUDA memory cap of `fraction`."""
    # loaded when the bench runs, not when the CLI builds its parser (see ich_tune.bench)
    import torch

    torch.cuda.set_per_process_memory_fraction(fraction)
    try:
        start, end = halfres_steps(256, 12, torch.bfloat16, steps)
    except torch.OutOfMemoryError:
        return {"oom": True}
    return {"oom": False, "start": start, "end": end, "samples": steps * 12,
            "peak_mib": torch.cuda.max_memory_allocated() / 2**20}


def run(args: argparse.Namespace) -> int:
    # loaded when the bench runs, not when the CLI builds its parser (see ich_tune.bench)
    import ray
    import torch

    if not torch.cuda.is_available():
        raise UserError("bench packing needs a CUDA GPU; none is visible here (torch.cuda.is_available() "
                        "is False).")
    ray.init(num_gpus=1, include_dashboard=False, log_to_driver=False)
    rows = []
    print(f"bench packing: {torch.cuda.get_device_name()}, halfres model, 256x256, batch 12, bf16")
    print(f"{'trials':>6} {'gpu':>6} {'samples/s':>10} {'per trial':>10} {'peak MiB':>9}")
    for k in (int(c) for c in args.counts.split(",")):
        task = ray.remote(num_gpus=1 / k)(train_share)
        shares = ray.get([task.remote(1 / k, args.steps) for _ in range(k)])
        if any(s["oom"] for s in shares):
            rows.append({"trials": k, "gpu": 1 / k, "oom": True})
            print(f"{k:>6} {1 / k:>6.3f} {'out of memory':>10}")
            continue
        wall = max(s["end"] for s in shares) - min(s["start"] for s in shares)
        rate = sum(s["samples"] for s in shares) / wall
        peak = max(s["peak_mib"] for s in shares)
        rows.append({"trials": k, "gpu": 1 / k, "oom": False, "samples_per_s": rate, "peak_mib": peak})
        print(f"{k:>6} {1 / k:>6.3f} {rate:>10.1f} {rate / k:>10.1f} {peak:>9.0f}")
    ray.shutdown()
    fitting = [r for r in rows if not r["oom"]]
    if not fitting:
        raise UserError("the halfres model runs out of memory even alone on this GPU.")
    best = fitting[0]
    for row in fitting[1:]:
        if row["samples_per_s"] >= 1.05 * best["samples_per_s"]:
            best = row
    print(f"recommended: resources.gpu: {best['gpu']:g} ({best['trials']} trials per GPU)")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "recommended_gpu": best["gpu"]}, indent=1))
    return 0
