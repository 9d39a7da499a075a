"""The README's main job runs end to end (shortened): 2 ranks under torchrun, loss goes down."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_tiny_gpt_under_torchrun():
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(ROOT / "examples" / "train_tiny_gpt.py"),
        "--steps", "24", "--eval-every", "12", "--n-layer", "1", "--n-embd", "64", "--batch-size", "8",
        "--block-size", "64", "--max-bytes", "400000", "--eval-batches", "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    evals = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    losses = [float(re.search(r"val loss (\d+\.\d+)", line).group(1)) for line in evals]
    assert len(losses) >= 3, done.stdout
    assert losses[-1] < losses[0] - 0.3, losses
    assert "tokens/s" in done.stdout
