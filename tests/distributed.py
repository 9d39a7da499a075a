"""Run a test function on N real gloo ranks, with a hard timeout so that a hang fails the test.

A pool of N spawned worker processes is kept per world size (spawning and importing torch is
the slow part), each with an initialised default process group. ``run`` sends the same function
to every rank and returns each rank's result; an exception on any rank fails the test with that
rank's traceback; a timeout kills the pool (a fresh one is spawned for the next test).
``backend="nccl"`` starts a separate pool whose rank r runs on GPU ``r % device_count``: one GPU
per rank needs as many GPUs as ranks (NCCL refuses two ranks on one GPU).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import tempfile
import traceback
from typing import Any, Callable

DEFAULT_TIMEOUT_S = 120.0


def _worker_main(rank: int, world_size: int, init_file: str, tasks, results, backend: str = "gloo") -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    while True:
        payload = tasks.get()
        if payload is None:
            break
        fn, args, kwargs = pickle.loads(payload)
        try:
            outcome = ("ok", fn(rank, world_size, *args, **kwargs))
        except BaseException:  # noqa: BLE001 - reported to the parent
            outcome = ("error", traceback.format_exc())
        try:
            data = pickle.dumps(outcome)
        except Exception:  # noqa: BLE001
            data = pickle.dumps(("error", "result could not be pickled:\n" + traceback.format_exc()))
        results.put((rank, data))
    dist.destroy_process_group()


class DistributedPool:
    def __init__(self, world_size: int, backend: str = "gloo") -> None:
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        fd, self._init_file = tempfile.mkstemp(prefix="acco-test-pg-")
        os.close(fd)
        os.unlink(self._init_file)  # the FileStore creates it
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._procs = [
            ctx.Process(target=_worker_main, args=(r, world_size, self._init_file, self._tasks[r], self._results, backend), daemon=True)
            for r in range(world_size)
        ]
        for p in self._procs:
            p.start()
        self.alive = True

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = DEFAULT_TIMEOUT_S, **kwargs: Any) -> list[Any]:
        payload = pickle.dumps((fn, args, kwargs))
        for q in self._tasks:
            q.put(payload)
        outcomes: dict[int, tuple[str, Any]] = {}
        try:
            while len(outcomes) < self.world_size:
                try:
                    rank, data = self._results.get(timeout=timeout)
                except queue.Empty:
                    missing = sorted(set(range(self.world_size)) - set(outcomes))
                    self.close(force=True)
                    errors = {r: o[1] for r, o in outcomes.items() if o[0] == "error"}
                    raise TimeoutError(
                        f"{fn.__name__} on {self.world_size} ranks: no answer from ranks {missing} within {timeout}s"
                        + "".join(f"\n--- rank {r} failed:\n{tb}" for r, tb in errors.items())
                    ) from None
                outcomes[rank] = pickle.loads(data)
        except BaseException:
            if self.alive and len(outcomes) < self.world_size:
                self.close(force=True)
            raise
        errors = {r: o[1] for r, o in sorted(outcomes.items()) if o[0] == "error"}
        if errors:
            raise AssertionError(
                f"{fn.__name__} failed on ranks {sorted(errors)}:" + "".join(f"\n--- rank {r}:\n{tb}" for r, tb in errors.items())
            )
        return [outcomes[r][1] for r in range(self.world_size)]

    def close(self, force: bool = False) -> None:
        if not self.alive:
            return
        self.alive = False
        if not force:
            for q in self._tasks:
                q.put(None)
            for p in self._procs:
                p.join(timeout=10)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
        try:
            os.unlink(self._init_file)
        except FileNotFoundError:
            pass


class PoolRegistry:
    """One live pool per world size, replaced after a timeout or crash."""

    def __init__(self) -> None:
        self._pools: dict[tuple[int, str], DistributedPool] = {}

    def __call__(
        self, world_size: int, fn: Callable[..., Any], *args: Any, timeout: float = DEFAULT_TIMEOUT_S, backend: str = "gloo", **kwargs: Any
    ) -> list[Any]:
        key = (world_size, backend)
        pool = self._pools.get(key)
        if pool is None or not pool.alive or not all(p.is_alive() for p in pool._procs):
            if pool is not None:
                pool.close(force=True)
            pool = self._pools[key] = DistributedPool(world_size, backend)
        return pool.run(fn, *args, timeout=timeout, **kwargs)

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
