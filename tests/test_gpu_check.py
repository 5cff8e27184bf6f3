"""bench/gpu_check.py must be runnable on any machine: without a GPU it says so in one line and succeeds."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the check would run for real")
def test_gpu_check_skips_without_a_gpu():
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py")], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "gpu_check: skipped, no CUDA device visible to torch"
