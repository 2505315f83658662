"""Benchmarks are measured by running them (python -m ich_tune bench ...), not here; this checks only
that one which cannot run on this machine says why instead of failing obscurely."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: packing would run")
def test_bench_packing_without_a_gpu_says_so():
    result = subprocess.run([sys.executable, "-m", "ich_tune", "bench", "packing"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "needs a CUDA GPU" in result.stderr
    assert "Traceback" not in result.stderr
