"""The package ships ``py.typed``: a user's script that uses the public API the documented way must
type-check (mypy, strict about the script, silent about torch's and acco's own internals)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

USER_SCRIPT = '''
import datetime

import torch

import acco
from acco import AccoOptimizer, CheckpointError, PipelineFailedError

model = torch.nn.Linear(4, 4)
opt = AccoOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), mode="acco", max_grad_norm=1.0,
                    timeout=datetime.timedelta(minutes=1))
other = AccoOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-3)
scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda call: 1.0)
model(torch.randn(2, 4)).sum().backward()
opt.step()
opt.zero_grad(set_to_none=True)
scheduler.step()
opt.finish()
sizes: dict[str, int] = opt.memory_bytes()
updates: int = opt.num_updates
saved = opt.state_dict()
portable = opt.consolidated_state_dict(to=0)
if portable is not None:
    opt.load_state_dict(portable)
sharded: dict[str, object] = opt.sharded_state_dict()
opt.load_sharded_state_dict(sharded)
with opt.committed_parameters():
    pass
torch.amp.GradScaler("cpu").step(opt)
try:
    opt.close()
except (CheckpointError, PipelineFailedError, acco.CollectiveError, acco.ShardedStateError):
    pass
'''


def test_a_users_script_type_checks(tmp_path):
    pytest.importorskip("mypy")
    assert (ROOT / "acco" / "py.typed").is_file()
    script = tmp_path / "user.py"
    script.write_text(USER_SCRIPT)
    env = {**os.environ, "MYPYPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--follow-imports=silent", "--cache-dir", str(tmp_path / "cache"), str(script)],
        capture_output=True, text=True, env=env, timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
