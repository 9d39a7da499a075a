"""The rank side of every benchmark: joining the process group, sharing numbers, reading memory.

A benchmark script is a *rank* when ``RANK`` is in its environment: started by torchrun on a
real cluster (env:// rendezvous) or by ``benchmarks.cluster`` on this machine, which adds
``ACCO_BENCH_STORE``: a file for ``torch.distributed.FileStore``, so that ranks in separate
network namespaces meet without a TCP store (their gloo traffic still crosses the veth links).
"""

from __future__ import annotations

import datetime
import gc
import os
import resource
from typing import Sequence

import torch
import torch.distributed as dist

STORE_ENV = "ACCO_BENCH_STORE"


def is_rank_process() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def network_of_this_run() -> str:
    """What the ranks' links are: set by our harness, else a real network (torchrun)."""
    return os.environ.get("ACCO_BENCH_NETWORK", "native")


def init(timeout_s: float = 300.0) -> tuple[int, int]:
    """Join the gloo (CPU) or NCCL (GPU) group and share the cores fairly. Returns (rank, world)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    store_path = os.environ.get(STORE_ENV)
    if store_path:
        store = dist.FileStore(store_path, world)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    else:
        dist.init_process_group(backend, timeout=timeout)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    # ranks of one host share its cores; oversubscription would measure thread thrashing
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return rank, world


def rank_and_world() -> tuple[int, int]:
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def shutdown() -> None:
    """Free the default group while the interpreter is alive: its gloo workers stop only when nothing holds it
    (examples/train_gpt.py, at its end, says why a worker left running at exit can abort the process)."""
    if dist.is_initialized():
        gc.collect()  # the last run's optimizer and model, and any cycle among them, let go of the group
        dist.destroy_process_group()


def gather_rows(values: Sequence[float]) -> list[list[float]]:
    """Every rank's row of floats, on every rank (fixed length, no pickling, no numpy)."""
    row = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if not dist.is_initialized():
        return [row.tolist()]
    out = torch.empty(dist.get_world_size() * row.numel(), dtype=torch.float64)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    gather(out, row)
    return out.view(dist.get_world_size(), -1).tolist()


def broadcast_float(value: float) -> float:
    """Rank 0's value on every rank (so that all ranks take the same decision)."""
    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.is_initialized():
        dist.broadcast(t, src=0)
    return t.item()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------- memory
def _status_bytes(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss_bytes() -> int:
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """Peak resident set size since the last ``reset_peak_rss()`` (or since start)."""
    peak = _status_bytes("VmHWM")
    return peak or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Linux resets the high-water mark on ``echo 5 > /proc/self/clear_refs``; False if it could not."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
