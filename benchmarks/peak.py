"""The peak of memory allocated by torch while a piece of code runs, above what was allocated before it.

A held buffer shows up in ``AccoOptimizer.memory_bytes()``; a temporary that is allocated and freed
inside a round does not, and on an 80 GB card it is what fails. This measures both, so that a
benchmark can hold the peak to the README's formula:

* CUDA: the caching allocator's own counters (``torch.cuda.max_memory_allocated``, reset on entry);
  every stream of the device counts.
* CPU: torch keeps no allocator statistics there, so the profiler records every allocation and free
  of torch's CPU allocator (``profile_memory=True``) and they are summed in time order. Only the
  calling thread is recorded: measure rounds that run in it (``engine="stream"`` on CPU runs each
  round inline, with the same device-side decisions as on a GPU).

    with AllocationPeak(device) as peak:
        opt.step()
    peak.peak_bytes   # the most allocated at once above the start
    peak.end_bytes    # still allocated at the end (a buffer kept), above the start
"""

from __future__ import annotations

from typing import Any, Optional

import torch


class AllocationPeak:
    def __init__(self, device: Any = "cpu") -> None:
        self.device = torch.device(device)
        self.peak_bytes = 0
        self.end_bytes = 0
        self._profiler: Optional[Any] = None
        self._start = 0

    def __enter__(self) -> "AllocationPeak":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
            self._profiler.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
            self.end_bytes = torch.cuda.memory_allocated(self.device) - self._start
            return
        self._profiler.__exit__(*exc)
        if exc[0] is not None:
            return
        self.peak_bytes, self.end_bytes = cpu_peak_and_end(self._profiler)


def cpu_peak_and_end(profiler: Any) -> tuple[int, int]:
    """(peak, end) of the running sum of the CPU allocator's events, in the order they happened.
    Reads the profiler's raw Kineto events: ``events()`` folds memory into the operators and can
    lose the allocations made outside any operator."""
    events = [
        (event.start_ns(), event.nbytes())
        for event in profiler.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    ]
    live = peak = 0
    for _, nbytes in sorted(events, key=lambda e: e[0]):
        live += nbytes
        peak = max(peak, live)
    return peak, live
