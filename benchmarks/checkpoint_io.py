"""Checkpoint save and load: time and memory per rank, torch.distributed.checkpoint against the consolidated file
(issue 26, part 2).

Three ways to save the same AccoOptimizer (mode acco, AdamW, fp32) and its model, and to load them back into a
freshly built model and optimizer:

* ``consolidated``: ``consolidated_state_dict(to=0)``, rank 0 ``torch.save``s one file; every rank
  ``torch.load``s it and calls ``load_state_dict`` (the form before issue 26);
* ``dcp``: ``dcp.save({"model": ..., "optimizer": opt.sharded_state_dict()})``, every rank writing its own shard;
  ``dcp.load`` into ``sharded_state_dict()``'s template, then ``load_sharded_state_dict``;
* ``dcp_async``: the same save through ``dcp.async_save``: the time the call blocks (its copy) and the time until
  the files are written; loaded as ``dcp``.

Per rank and operation: wall time (between barriers, the slowest rank; median of ``--repeats``), and in one more
launch of its own, the peak of memory above what was allocated before the operation, two ways: torch's CPU
allocator (profiler events of the calling thread: ``benchmarks/peak.py``) and the resident set's high-water
mark (every thread, every allocator; VmHWM reset right before; glibc's mmap threshold fixed in that launch, as
report 2 does, so that the RSS follows the live bytes). The reference sizes: one shard's optimizer state,
(1 + k)·S·m (master and k = 2 AdamW moments), the whole optimizer state (1 + k)·P·m, and the model P·b. The files are read back while in the page cache: load times
are what the CPU and memory cost, not a disk's.

    python -m benchmarks.checkpoint_io --world 2,4 --model medium --repeats 3
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from acco import AccoOptimizer

from . import launcher, ranks, report
from .gpt import MODELS, Batches, build_model, count_parameters, load_corpus, model_config, param_groups
from .peak import AllocationPeak

METHODS = ("consolidated", "dcp", "dcp_async")
K = 2  # AdamW's state tensors per element
M = B = 4  # fp32 master and parameter bytes


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default="2,4", help="world sizes, comma-separated")
    p.add_argument("--bandwidth", default="none", help="link rate of the simulated cluster (none: unlimited)")
    p.add_argument("--model", choices=sorted(MODELS), default="medium")
    p.add_argument("--calls", type=int, default=4, help="training calls before saving (the optimizer state exists)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3, help="timed saves and loads per method (then one pass measuring memory)")
    p.add_argument("--dir", default=None, help="where the ranks write (a shared filesystem on a cluster; default: a temporary folder)")
    p.add_argument("--seed", type=int, default=1337)
    launcher.add_common_arguments(p, "benchmarks/results/checkpoint_io.json")
    return p


def _fresh(config: Any, seed: int, corpus: Any, calls: int, rank: int, batch_size: int) -> tuple[torch.nn.Module, AccoOptimizer]:
    model = build_model(config, seed)
    opt = AccoOptimizer(torch.optim.AdamW(param_groups(model, 0.1), lr=3e-4, betas=(0.9, 0.95)), mode="acco", batch_rule_applied=True)
    batches = Batches(corpus.train, config.block_size, batch_size, seed, rank)
    for _ in range(calls):
        x, y = batches.next()
        model(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt


def _save(method: str, model: torch.nn.Module, opt: AccoOptimizer, where: Path) -> Optional[Callable[[], None]]:
    """Save; for ``dcp_async`` returns the wait for the files (the call itself returns after its copy)."""
    if method == "consolidated":
        state = opt.consolidated_state_dict(to=0)
        if dist.get_rank() == 0:
            torch.save({"model": model.state_dict(), "optimizer": state}, where / "consolidated.pt")
        return None
    state = {"model": model.state_dict(), "optimizer": opt.sharded_state_dict()}
    if method == "dcp":
        dcp.save(state, checkpoint_id=where / "dcp")
        return None
    future = dcp.async_save(state, checkpoint_id=where / "dcp")
    return lambda: future.result()


def _load(method: str, model: torch.nn.Module, opt: AccoOptimizer, where: Path) -> None:
    if method == "consolidated":
        state = torch.load(where / "consolidated.pt", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        return
    state = {"model": model.state_dict(), "optimizer": opt.sharded_state_dict()}
    dcp.load(state, checkpoint_id=where / "dcp")
    model.load_state_dict(state["model"])
    opt.load_sharded_state_dict(state["optimizer"])


def _timed_save(method: str, model: torch.nn.Module, opt: AccoOptimizer, where: Path) -> tuple[float, float]:
    """(until the call returns, until the files are written), this rank, from a common start."""
    ranks.barrier()
    start = time.perf_counter()
    wait = _save(method, model, opt, where)
    call = time.perf_counter() - start
    if wait is not None:
        wait()
    total = time.perf_counter() - start
    ranks.barrier()
    return call, total


def _timed_load(method: str, model: torch.nn.Module, opt: AccoOptimizer, where: Path) -> float:
    ranks.barrier()
    start = time.perf_counter()
    _load(method, model, opt, where)
    elapsed = time.perf_counter() - start
    ranks.barrier()
    return elapsed


def _measured(fn: Callable[[], Any]) -> tuple[int, int, int]:
    """(torch allocator peak during ``fn``, resident-set peak until ``fn`` and what it returns to wait for are
    done, allocator bytes still held after ``fn``: a load's new optimizer state), above what was there before.
    The profiler sees the calling thread only: for ``dcp_async``, the copy the call takes; the resident set
    also sees the background writer."""
    gc.collect()
    ranks.barrier()
    ranks.reset_peak_rss()
    before = ranks.rss_bytes()
    with AllocationPeak("cpu") as peak:
        wait = fn()
    if callable(wait):
        wait()
    rss = ranks.peak_rss_bytes() - before
    ranks.barrier()
    return peak.peak_bytes, rss, peak.end_bytes


def rank_main(args: argparse.Namespace) -> Optional[dict[str, Any]]:
    """One phase per launch (fresh processes): "time" with glibc's default allocator, or "memory" with its
    mmap threshold fixed first (freed blocks then leave the resident set at once, so that the RSS follows the
    live bytes: see benchmarks.memory), whose page faults would slow the timed runs down."""
    phase = launcher.only_method() or "time"
    if phase == "memory":
        _fix_mmap_threshold()
    rank, world = ranks.rank_and_world()
    config = model_config(args.model)
    corpus = load_corpus(None, 300_000)
    root = Path(args.dir) if args.dir else Path(tempfile.gettempdir()) / "acco-ckpt-bench"
    where = root / f"world{world}-{phase}"
    if rank == 0:
        shutil.rmtree(where, ignore_errors=True)
        where.mkdir(parents=True)
    ranks.barrier()
    model, opt = _fresh(config, args.seed, corpus, args.calls, rank, args.batch_size)
    numel = count_parameters(model)
    shard = opt.layout.shard_size
    rows, files = [], {}
    if phase == "time":
        times: dict[str, dict[str, list[float]]] = {m: {"save": [], "save_call": [], "load": []} for m in METHODS}
        for _ in range(args.repeats):  # methods interleaved: a drift in the machine's load hits each alike
            for method in METHODS:
                call, total = _timed_save(method, model, opt, where)
                times[method]["save_call"].append(call)
                times[method]["save"].append(total)
                files[method] = _bytes_on_disk(where)
                target_model, target_opt = _fresh(config, args.seed + 1, corpus, 0, rank, args.batch_size)
                times[method]["load"].append(_timed_load(method, target_model, target_opt, where))
                target_opt.close()
                del target_model, target_opt
                _empty(where, rank)
        for method in METHODS:
            for op in ("save", "load"):
                spent = times[method][op]
                call = statistics.median(times[method]["save_call"]) if op == "save" else 0.0
                everyone = ranks.gather_rows([statistics.median(spent), min(spent), max(spent), call])
                rows.append({"method": method, "operation": op, "time_s": max(r[0] for r in everyone),
                             "time_min_s": max(r[1] for r in everyone), "time_max_s": max(r[2] for r in everyone),
                             "call_s": max(r[3] for r in everyone) if op == "save" else None})
    else:
        for method in METHODS:
            measured = {"save": _measured(lambda: _save(method, model, opt, where))}
            target_model, target_opt = _fresh(config, args.seed + 1, corpus, 0, rank, args.batch_size)
            measured["load"] = _measured(lambda: _load(method, target_model, target_opt, where))
            target_opt.close()
            del target_model, target_opt
            _empty(where, rank)
            for op, (alloc, rss, held) in measured.items():
                everyone = ranks.gather_rows([alloc, rss, held])
                rows.append({"method": method, "operation": op, "alloc_peak_bytes": [int(r[0]) for r in everyone],
                             "rss_peak_bytes": [int(r[1]) for r in everyone], "alloc_held_after_bytes": [int(r[2]) for r in everyone]})
    opt.close()
    if rank == 0:
        shutil.rmtree(where, ignore_errors=True)
    return {"phase": phase, "parameters": numel, "shard_size": shard, "rows": rows, "file_bytes": files,
            "one_shard_state_bytes": (1 + K) * shard * M, "whole_state_bytes": (1 + K) * numel * M, "model_bytes": numel * B}


def _fix_mmap_threshold() -> None:
    """glibc's ``mallopt(M_MMAP_THRESHOLD, 128 KiB)``, as ``MALLOC_MMAP_THRESHOLD_`` would set it at start."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: the RSS column then counts the allocator's cached blocks too


def _empty(where: Path, rank: int) -> None:
    """Each save writes a fresh checkpoint (DCP would warn about overwriting one, and time it)."""
    gc.collect()
    ranks.barrier()
    if rank == 0:
        for entry in where.iterdir():
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    ranks.barrier()


def _bytes_on_disk(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def settings_of(args: argparse.Namespace) -> list[launcher.Setting]:
    """Per world size, one launch that times and one that measures memory (fresh processes each)."""
    return [launcher.Setting(s.world, s.bandwidth_bps, phase) for s in launcher.parse_settings(args.world, args.bandwidth)
            for phase in ("time", "memory")]


def make_report(args: argparse.Namespace, argv: list[str], partials: list[dict[str, Any]]) -> None:
    merged: dict[tuple[int, str, str], dict[str, Any]] = {}
    for part in partials:
        for row in part["rows"]:
            key = (part["world"], row["method"], row["operation"])
            entry = merged.setdefault(key, {**report.where(part), "parameters": part["parameters"], "shard_size": part["shard_size"],
                                            "one_shard_state_bytes": part["one_shard_state_bytes"],
                                            "whole_state_bytes": part["whole_state_bytes"], "model_bytes": part["model_bytes"]})
            entry.update({k: v for k, v in row.items()})
            if part["file_bytes"]:
                entry["file_bytes"] = part["file_bytes"].get(row["method"])
    results = [merged[key] for key in sorted(merged, key=lambda k: (k[0], METHODS.index(k[1]), k[2] != "save"))]
    config = report.config(
        "checkpoint_io", args, argv, partials[0]["parameters"] if partials else None,
        memory="a launch of its own: peak above the bytes held before the operation, torch's CPU allocator (profiler, "
               "calling thread) and VmHWM (every thread; reset right before; glibc's mmap threshold fixed at 128 KiB); per rank",
        time="a launch of its own (default allocator): wall seconds between barriers, the slowest rank; median over "
             "--repeats (min, max in the JSON)",
    )
    data = {"config": config, "results": results}
    report.write(args.json, data, markdown(data), None, make_plot=False)


def markdown(data: dict[str, Any]) -> str:
    c = data["config"]
    first = data["results"][0] if data["results"] else {}
    lines = [
        f"Checkpoint save and load: model {c['model']} ({(c['parameters'] or 0) / 1e6:.1f}M parameters, fp32), AccoOptimizer "
        f"(AdamW, mode acco) after {c['calls']} calls, gloo, {first.get('network', '?')}; time: median of {c['repeats']} (s); "
        "memory in MiB above what was held before the operation (allocator: torch's CPU allocator on the calling "
        "thread; held after: still allocated when it returns, a load's new optimizer state; RSS: the process's "
        "high-water mark), rank 0 / the largest other rank. One shard's state = (1 + k)·S·m, the whole state = "
        f"(1 + k)·P·m, the model P·b = {report.mib(first.get('model_bytes', 0)):.0f} MiB.", "",
    ]
    rows = []
    for r in data["results"]:
        others = lambda values: max(values[1:]) if len(values) > 1 else 0  # noqa: E731
        both = lambda key: f"{report.mib(r[key][0]):.0f} / {report.mib(others(r[key])):.0f}" if key in r else None  # noqa: E731
        rows.append([
            r["world"], r["method"], r["operation"], None if "time_s" not in r else f"{r['time_s']:.2f}",
            None if r.get("call_s") is None else f"{r['call_s']:.2f}",
            both("alloc_peak_bytes"), both("alloc_held_after_bytes"), both("rss_peak_bytes"),
            f"{report.mib(r['one_shard_state_bytes']):.0f}", f"{report.mib(r['whole_state_bytes']):.0f}",
            None if r["operation"] != "save" or r.get("file_bytes") is None else f"{report.mib(r['file_bytes']):.0f}",
        ])
    lines.append(report.markdown_table(
        ["world", "method", "operation", "time (s)", "call returns (s)", "allocator peak", "allocator held after", "RSS peak",
         "one shard's state", "whole state", "on disk"], rows))
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    return launcher.main("benchmarks.checkpoint_io", parser(), argv, settings_of, rank_main, make_report)


if __name__ == "__main__":
    raise SystemExit(main())
