"""Rank side of the throughput-style reports: run each method for a timed window, side by side.

Inside one launch of the ranks, the methods are interleaved and repeated (repeat 0: every method,
repeat 1: every method, ...), so that process start-up and rendezvous are paid once and a drift
in machine load hits every method alike. Each run builds a fresh model (same seed) and optimizer,
runs warm-up rounds, meets the other ranks at a barrier, then times a window of rounds.

The window is counted in *rounds* (synchronised steps), not in calls: every rank launches the
same rounds, while in non-blocking mode a fast rank makes more calls per round. Samples are
micro-batches actually processed, summed over ranks; in mode acco two calls make one update.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from . import ranks
from .gpt import Batches, GPTConfig, build_model, count_parameters, load_corpus, param_groups
from .methods import Method, build_method, calls_per_update


# torch 2.13 renamed these (*_single); older releases only have the *_tensor names
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class Spec:
    """What one launch measures (identical on every rank)."""

    model: GPTConfig
    batch_size: int  # sequences per rank per call
    methods: list[str]
    repeats: int
    warmup_rounds: int
    rounds: int
    lr: float = 3e-4
    seed: int = 1337
    data: Optional[str] = None
    max_bytes: int = 1_000_000
    slow_rank: Optional[int] = None  # heterogeneous: this rank sleeps after each micro-batch
    slow_factor: float = 1.0  # ... (factor - 1) x its own compute time
    label: str = ""  # progress-line prefix


@dataclass
class Window:
    calls: int
    seconds: float
    updates: int


def _slowdown_seconds(spec: Spec, model_factory: Callable[[], torch.nn.Module], batches: Batches, rank: int) -> float:
    """Heterogeneous runs: the slow rank's extra sleep per micro-batch, (factor - 1) x the median of
    its own forward+backward time, measured once here on this rank alone (no communication)."""
    if spec.slow_rank is None or spec.slow_factor <= 1.0 or rank != spec.slow_rank:
        return 0.0
    model = model_factory()
    times = []
    for _ in range(5):
        x, y = batches.next()
        start = time.perf_counter()
        model(x, y).backward()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return (spec.slow_factor - 1.0) * statistics.median(times[1:])


def run_window(method: Method, batches: Batches, warmup_rounds: int, rounds: int, sleep_s: float = 0.0) -> Window:
    """Warm up, meet, then time until this rank has launched ``warmup_rounds + rounds`` rounds."""

    def call() -> None:
        x, y = batches.next()
        method.compute(x, y)
        if sleep_s:
            time.sleep(sleep_s)  # a slower device: its micro-batch takes factor x as long
        method.update()

    while method.rounds < warmup_rounds:
        call()
    ranks.barrier()  # default group; acco's rounds run on a private one
    updates_before = method.updates
    calls, start = 0, time.perf_counter()
    while method.rounds < warmup_rounds + rounds:
        call()
        calls += 1
    seconds = time.perf_counter() - start
    return Window(calls=calls, seconds=seconds, updates=method.updates - updates_before)


def comm_round_seconds(numel: int, repeats: int = 3) -> float:
    """One round's communication alone (reduce-scatter + all-gather of the model, fp32), median."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return 0.0
    world = dist.get_world_size()
    shard = -(-numel // world)
    full, part = torch.ones(shard * world), torch.empty(shard)
    times = []
    for i in range(repeats + 1):
        dist.barrier()
        start = time.perf_counter()
        _reduce_scatter(part, full)
        _all_gather(full, part)
        if i:  # the first one sets up connections
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(spec: Spec) -> Optional[dict[str, Any]]:
    """Run every (repeat, method); rank 0 returns the raw runs and the setting, others None."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    corpus = load_corpus(spec.data, spec.max_bytes)

    def model_factory() -> torch.nn.Module:
        return build_model(spec.model, spec.seed)

    numel = count_parameters(model_factory())
    comm_s = comm_round_seconds(numel)
    sleep_s = _slowdown_seconds(spec, model_factory, Batches(corpus.train, spec.model.block_size, spec.batch_size, spec.seed, rank), rank)
    sleeps = ranks.gather_rows([sleep_s])
    runs: list[dict[str, Any]] = []
    for repeat in range(spec.repeats):
        for name in spec.methods:
            model = model_factory()
            method = build_method(name, model, param_groups(model, 0.1), spec.lr)
            batches = Batches(corpus.train, spec.model.block_size, spec.batch_size, spec.seed + 7919 * (repeat + 1), rank)
            gc.collect()
            ranks.reset_peak_rss()
            window = run_window(method, batches, spec.warmup_rounds, spec.rounds, sleep_s)
            method.finish()
            peak = ranks.peak_rss_bytes()
            method.close()
            del method, model
            rows = ranks.gather_rows([window.calls, window.seconds, window.updates, peak])
            run = _summarise_run(name, repeat, rows, spec.batch_size)
            runs.append(run)
            if rank == 0:
                print(
                    f"[{spec.label}] repeat {repeat + 1}/{spec.repeats} {name:>16}: {run['samples_per_s']:8.1f} samples/s, "
                    f"{run['step_time_s']:.3f} s/call, calls per rank {run['calls_per_rank']}",
                    file=sys.stderr, flush=True,
                )
    if rank != 0:
        return None
    return {
        "world": world,
        "parameters": numel,
        "comm_round_s": comm_s,
        "slow_sleep_s": [row[0] for row in sleeps],
        "runs": runs,
    }


def _summarise_run(name: str, repeat: int, rows: list[list[float]], batch_size: int) -> dict[str, Any]:
    calls = [int(r[0]) for r in rows]
    seconds = [r[1] for r in rows]
    # Sum of the ranks' own rates. Ranks that meet every round end their windows together, so
    # this equals all samples / window; ranks that never meet (compute_only with a slowed rank)
    # each count at their own speed: the physical limit of a heterogeneous cluster.
    samples_per_s = sum(c * batch_size / s for c, s in zip(calls, seconds))
    return {
        "method": name,
        "repeat": repeat,
        "calls_per_rank": calls,
        "window_s": max(seconds),
        "samples": sum(calls) * batch_size,
        "samples_per_s": samples_per_s,
        # seconds per micro-batch per rank (world * batch / samples_per_s)
        "step_time_s": len(calls) * batch_size / samples_per_s,
        "updates": int(rows[0][2]),
        "peak_rss_bytes": int(max(r[3] for r in rows)),
    }


def summarise(measured: dict[str, Any], methods: list[str], extra: dict[str, Any]) -> list[dict[str, Any]]:
    """Medians and spreads per method, plus the ratios against compute_only and zero1 (ratios of
    medians; each row also carries the per-repeat values)."""
    by_method: dict[str, list[dict]] = {m: [r for r in measured["runs"] if r["method"] == m] for m in methods}
    median_sps = {m: statistics.median(r["samples_per_s"] for r in runs) for m, runs in by_method.items() if runs}
    compute_sps = median_sps.get("compute_only")
    zero1_sps = median_sps.get("zero1")
    results = []
    for name, runs in by_method.items():
        if not runs:
            continue
        sps = [r["samples_per_s"] for r in runs]
        step = [r["step_time_s"] for r in runs]
        results.append({
            **extra,
            "method": name,
            "samples_per_s": median_sps[name],
            "samples_per_s_spread": [min(sps), max(sps)],
            "samples_per_s_runs": sps,
            "step_time_s": statistics.median(step),
            "step_time_s_spread": [min(step), max(step)],
            # compute_only_time / method_time, per micro-batch: the share of the physical limit reached
            "overlap_efficiency": median_sps[name] / compute_sps if compute_sps else None,
            "speedup_vs_zero1": median_sps[name] / zero1_sps if zero1_sps else None,
            "calls_per_update": calls_per_update(name),
            "updates_per_s": statistics.median(r["updates"] / r["window_s"] for r in runs),
            "calls_per_rank": runs[len(runs) // 2]["calls_per_rank"],
            "peak_rss_bytes": int(statistics.median(r["peak_rss_bytes"] for r in runs)),
            "comm_round_s": measured["comm_round_s"],
            "parameters": measured["parameters"],
        })
    return results
