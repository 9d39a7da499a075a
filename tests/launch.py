"""Run a script under torchrun (2 CPU ranks) from a test: bounded in time, and no process left behind.

torchrun starts each worker in a session of its own, so killing torchrun (or its process group) on a timeout
would leave the workers running. Every process of one launch inherits a marker in its environment; when the
launch ends, for any reason, whatever still carries the marker is killed by its pid.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

MARKER = "ACCO_TEST_LAUNCH"


def torchrun(script: Path, *args: str, cwd: Path, timeout: float, max_restarts: int = 0,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 --max-restarts N script args``; fails the test on a timeout.

    With restarts, ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` gives a restarted group a fresh store (README,
    "Checkpointing and resuming": without it the restarted group fails to connect or hangs)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--max-restarts", str(max_restarts), str(script), *args]
    token = uuid.uuid4().hex
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {}), MARKER: token}
    if max_restarts:
        full_env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    agent = subprocess.Popen(command, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        stdout, stderr = agent.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_launch(agent, token)
        stdout, stderr = agent.communicate()
        raise AssertionError(f"torchrun {script.name} still running after {timeout} s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    finally:
        kill_launch(agent, token)
    return subprocess.CompletedProcess(command, agent.returncode, stdout, stderr)


def kill_launch(agent: subprocess.Popen, token: str) -> None:
    """SIGKILL the agent, then every process whose environment carries this launch's marker."""
    if agent.poll() is None:
        try:
            os.killpg(agent.pid, signal.SIGKILL)
        except ProcessLookupError:  # it ended meanwhile
            pass
    for pid in _marked_processes(token):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _marked_processes(token: str) -> list[int]:
    entry = f"{MARKER}={token}".encode()
    found = []
    for name in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if entry in f.read().split(b"\0"):
                    found.append(int(name))
        except OSError:  # gone, or not ours
            continue
    return found
