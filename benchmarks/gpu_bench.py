"""One device, one process, world size 1: acco's three modes against compute alone and torch's ZeRO-1.

With a single worker nothing crosses a network: the reduce-scatter and the all-gather of a round are
copies. What is left to measure is what the optimizer adds to a training step (copying the
gradients out, the sharded AdamW step on the fp32 master, copying the parameters back) and how much
of it mode ``acco`` / ``dpu`` hide behind the next forward and backward, against mode ``sync``
(which waits for every round) and against no optimizer at all (``compute_only``: the limit).

Methods, interleaved (repeat 1: every method; repeat 2: every method; ...), each run with a fresh
model (same initial weights) and optimizer and the same batches:

* ``compute_only``: forward, backward, gradients zeroed; no optimizer.
* ``sync``, ``dpu``, ``acco``: ``AccoOptimizer(torch.optim.AdamW(...), mode=...)``, blocking.
* ``zero1``: ``torch.distributed.optim.ZeroRedundancyOptimizer`` (fused AdamW) on a 1-rank group.

    python -m benchmarks.gpu_bench --device cuda --model gpt125m --dtype bf16 --json benchmarks/results/gpu_check.json

Writes ``<json>`` (``config`` + ``results``) and ``<json stem>.md`` (a table); one progress line per
run on stderr. Exit code 1 if any run failed (the others are still reported).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import math
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from acco import AccoOptimizer

from . import ranks, report
from .gpt import MODELS, Batches, build_model, count_parameters, load_corpus, model_config, param_groups

METHODS = ("compute_only", "sync", "dpu", "acco", "zero1")
ACCO_METHODS = ("sync", "dpu", "acco")  # the method's name is the mode
DTYPES = ("bf16", "bf16-autocast", "fp32")
BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.1
TRACE_STEPS = 5
RESULT_KEYS = ("step_time_s", "step_time_s_spread", "samples_per_s", "ratio_to_compute_only", "ratio_to_sync",
               "peak_memory_bytes", "memory_vs_zero1", "final_loss")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--model", choices=sorted(MODELS), default="gpt125m")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="bf16: bf16 parameters (acco keeps an fp32 master shard); bf16-autocast: fp32 parameters, "
                        "forward under autocast; fp32 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step() call (default: 8 on cuda, 4 on cpu)")
    p.add_argument("--steps", type=int, default=30, help="timed step() calls per run")
    p.add_argument("--warmup", type=int, default=10, help="untimed step() calls before them")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--data", default=None, help="a text file to train on (default: the stdlib's source)")
    p.add_argument("--max-bytes", type=int, default=4_000_000)
    p.add_argument("--json", type=Path, default=report.RESULTS / "gpu_check.json")
    p.add_argument("--engine", default=None,
                   help="AccoOptimizer(engine=...) for the acco modes, where acco has that argument (default: acco's choice)")
    p.add_argument("--trace", action="store_true",
                   help=f"after the measurements, profile {TRACE_STEPS} steps of each method (an extra, untimed run) "
                        "and write <json stem>_trace_<method>.json (chrome://tracing, Perfetto)")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.dtype is None:
        args.dtype = "bf16" if cuda else "fp32"
    if args.batch_size is None:
        args.batch_size = 8 if cuda else 4
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if min(args.steps, args.repeats, args.batch_size) < 1 or args.warmup < 0:
        p.error("--steps, --repeats and --batch-size must be >= 1, --warmup >= 0")
    return args


# ----------------------------------------------------------------------------- one run
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        ranks.reset_peak_rss()


def peak_memory(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else ranks.peak_rss_bytes()


def make_optimizer(name: str, model: torch.nn.Module, args: argparse.Namespace) -> Optional[torch.optim.Optimizer]:
    if name == "compute_only":
        return None
    groups = param_groups(model, WEIGHT_DECAY)
    if name == "zero1":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, lr=args.lr, betas=BETAS, fused=True)
    assert name in ACCO_METHODS, name
    inner = torch.optim.AdamW(groups, lr=args.lr, betas=BETAS, weight_decay=WEIGHT_DECAY)  # acco fuses it on the shard
    options = {} if args.engine is None else {"engine": args.engine}
    return AccoOptimizer(inner, mode=name, batch_rule_applied=True, **options)


def train(model, opt, batches, device: torch.device, autocast: bool) -> torch.Tensor:
    """The training loop being timed: no ``.item()`` (a host sync) inside it."""
    loss = torch.zeros(())
    for x, y in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(x, y)
        loss.backward()
        if opt is None:
            model.zero_grad(set_to_none=True)
        else:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return loss.detach()


def run(name: str, base: torch.nn.Module, batches: list, args: argparse.Namespace, device: torch.device,
        trace_path: Optional[Path] = None) -> dict[str, Any]:
    """Build a fresh model and optimizer, warm up, time ``--steps`` calls (``finish()`` included)."""
    reset_memory(device)
    start_memory = torch.cuda.memory_allocated(device) if device.type == "cuda" else ranks.rss_bytes()
    param_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    autocast = args.dtype == "bf16-autocast"
    model = copy.deepcopy(base).to(device=device, dtype=param_dtype)
    opt = make_optimizer(name, model, args)
    try:
        train(model, opt, batches[: args.warmup], device, autocast)
        timed = batches[args.warmup:]
        profiler: Any = contextlib.nullcontext()
        if trace_path is not None:
            timed = timed[:TRACE_STEPS]
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            profiler = torch.profiler.profile(activities=activities)
        synchronize(device)
        with profiler:
            start = time.perf_counter()
            last_loss = train(model, opt, timed, device, autocast)
            if isinstance(opt, AccoOptimizer):
                opt.finish()  # drain the round in flight: its time counts
            synchronize(device)
            seconds = time.perf_counter() - start
        if trace_path is not None:
            profiler.export_chrome_trace(str(trace_path))
        out: dict[str, Any] = {
            "step_time_s": seconds / len(timed), "peak_memory_bytes": peak_memory(device),
            "start_memory_bytes": start_memory, "final_loss": last_loss.item(),
        }
        if isinstance(opt, AccoOptimizer):
            out["optimizer_memory_bytes"] = opt.memory_bytes()
            out["updates"] = opt.num_updates
            out["engine"] = engine_name(opt)
        return out
    finally:
        if isinstance(opt, AccoOptimizer):
            opt.close()
        del model, opt
        reset_memory(device)


def engine_name(opt: AccoOptimizer) -> Optional[str]:
    """Which round engine ran (issue #6): the ``engine`` property, or the engine's class name."""
    name = getattr(opt, "engine", None)
    if isinstance(name, str):
        return name
    engine = getattr(opt, "_engine", None)
    return None if engine is None else type(engine).__name__


# ----------------------------------------------------------------------------- report
def summarise(runs: dict[str, list[dict]], errors: dict[str, str], args: argparse.Namespace, block_size: int) -> list[dict]:
    medians = {m: statistics.median(r["step_time_s"] for r in rs) for m, rs in runs.items() if rs}
    peaks = {m: max(r["peak_memory_bytes"] for r in rs) for m, rs in runs.items() if rs}
    results = []
    for method in args.methods:
        rs = runs.get(method, [])
        row: dict[str, Any] = {"method": method, "error": errors.get(method)} | dict.fromkeys(RESULT_KEYS)
        if rs:
            step, times = medians[method], [r["step_time_s"] for r in rs]
            last = rs[-1]
            row.update({
                "step_time_s": step,
                "step_time_s_spread": [min(times), max(times)],
                "step_times_s": times,
                "samples_per_s": args.batch_size / step,
                "tokens_per_s": args.batch_size * block_size / step,
                "ratio_to_compute_only": medians["compute_only"] / step if "compute_only" in medians else None,
                "ratio_to_sync": medians["sync"] / step if "sync" in medians else None,
                "peak_memory_bytes": peaks[method],
                "memory_vs_zero1": peaks[method] / peaks["zero1"] if "zero1" in peaks else None,
                "final_loss": last["final_loss"],
            })
            for key in ("start_memory_bytes", "optimizer_memory_bytes", "updates", "engine"):
                if key in last:
                    row[key] = last[key]
        results.append(row)
    return results


def markdown(results: list[dict], config: dict, args: argparse.Namespace) -> str:
    memory = "peak `torch.cuda.max_memory_allocated()`" if config["device"] == "cuda" else (
        "peak RSS of the process (VmHWM, reset before each run; on CPU it includes memory the allocator kept)")
    text = (
        f"**{config['device_name']}**, torch {config['environment']['torch']}, model {args.model} "
        f"({config['parameters'] / 1e6:.1f}M parameters), dtype {args.dtype}, {args.batch_size} sequences of "
        f"{config['model_config']['block_size']} bytes per step() call, {args.steps} timed calls after {args.warmup} "
        f"warm-up calls, medians of {args.repeats} interleaved repeats (spread: min–max); acco's round engine: "
        f"{', '.join(sorted({str(r['engine']) for r in results if r.get('engine')})) or '–'}.\n\n"
        "World size 1, one process: no network. The reduce-scatter and all-gather of a round are local copies, so "
        "what these ratios measure is the cost of the optimizer step and of the copies, and how much of it is "
        "overlapped with the next forward and backward. **vs compute_only** = compute_only's step time / the "
        "method's (1.0 = the optimizer is free: everything is hidden; the overlap efficiency). **vs sync** = "
        "sync's step time / the method's (above 1: faster than acco's own ZeRO-1, which waits for every round). "
        "In mode acco two step() calls make one committed update; samples/s counts calls, as everywhere. zero1 is "
        "torch's ZeroRedundancyOptimizer with fused AdamW in the parameters' own dtype (with bf16 parameters: no "
        f"fp32 master, less memory than acco). Memory: {memory}; *held* = `AccoOptimizer.memory_bytes()['total']`. "
        "The loss is that of the last timed call (training happened).\n\n"
    )
    rows = []
    for r in results:
        if r.get("step_time_s") is None:
            rows.append([r["method"], f"failed: {r['error']}"] + [None] * 8)
            continue
        lo, hi = r["step_time_s_spread"]
        held = r.get("optimizer_memory_bytes", {}).get("total")
        rows.append([
            r["method"], f"{r['step_time_s'] * 1e3:.1f}", f"{lo * 1e3:.1f}–{hi * 1e3:.1f}", f"{r['samples_per_s']:.1f}",
            _ratio(r["ratio_to_compute_only"]), _ratio(r["ratio_to_sync"]), f"{report.mib(r['peak_memory_bytes']):.0f}",
            _ratio(r["memory_vs_zero1"]), None if held is None else f"{report.mib(held):.0f}", f"{r['final_loss']:.3f}",
        ])
    headers = ["method", "ms/step", "spread (ms)", "samples/s", "vs compute_only", "vs sync", "peak MiB", "vs zero1",
               "held MiB", "loss"]
    return text + report.markdown_table(headers, rows)


def _ratio(value: Optional[float]) -> Optional[str]:
    return None if value is None else f"{value:.3f}"


# ----------------------------------------------------------------------------- main
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("[gpu_bench] --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
            return 2
        if device.index is None:  # torch.cuda.set_device refuses a device without an index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    config = model_config(args.model)
    corpus = load_corpus(args.data, args.max_bytes)
    stream = Batches(corpus.train, config.block_size, args.batch_size, args.seed, 0)
    batches = [tuple(t.to(device) for t in stream.next()) for _ in range(args.warmup + args.steps)]
    base = build_model(config, args.seed)  # on the CPU, in fp32; every run copies it
    parameters = count_parameters(base)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"[gpu_bench] {device_name}, {args.model} ({parameters / 1e6:.1f}M), {args.dtype}, batch {args.batch_size}, "
          f"{args.steps} steps after {args.warmup}, {args.repeats} repeats", file=sys.stderr, flush=True)

    runs: dict[str, list[dict]] = {m: [] for m in args.methods}
    errors: dict[str, str] = {}
    traces: list[str] = []

    def write_report(repeats_done: int) -> list[dict]:
        """Written after every run, so that a run stopped by a timeout (or a hung baseline) still
        leaves the numbers measured so far."""
        results = summarise(runs, errors, args, config.block_size)
        cfg = report.config(
            "gpu_bench", args, argv, parameters, device=device.type, device_name=device_name, world=1,
            repeats_done=repeats_done, traces=traces, errors=errors,
            peak_memory="torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS (VmHWM, reset per run)",
        )
        report.write(args.json, {"config": cfg, "results": results}, markdown(results, cfg, args))
        return results

    store = tempfile.mkdtemp(prefix="acco-gpu-bench-")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{store}/store",
                            world_size=1, rank=0)
    try:
        for repeat in range(args.repeats):
            for method in args.methods:
                if method in errors:
                    continue
                try:
                    r = run(method, base, batches, args, device)
                except Exception as error:  # noqa: BLE001 - reported, the other methods still run
                    traceback.print_exc()
                    errors[method] = f"{type(error).__name__}: {error}"
                    print(f"[gpu_bench] repeat {repeat + 1}/{args.repeats} {method}: FAILED {errors[method]}",
                          file=sys.stderr, flush=True)
                    continue
                runs[method].append(r)
                print(f"[gpu_bench] repeat {repeat + 1}/{args.repeats} {method}: {r['step_time_s'] * 1e3:.1f} ms/step, "
                      f"{args.batch_size / r['step_time_s']:.1f} samples/s, peak {report.mib(r['peak_memory_bytes']):.0f} MiB, "
                      f"loss {r['final_loss']:.3f}", file=sys.stderr, flush=True)
                results = write_report(repeat + (method == args.methods[-1]))
            results = write_report(repeat + 1)
        if args.trace:
            for method in args.methods:
                path = args.json.with_name(f"{args.json.stem}_trace_{method}.json")
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    run(method, base, batches, args, device, trace_path=path)
                    traces.append(str(path))
                    print(f"[gpu_bench] trace {method}: wrote {path}", file=sys.stderr, flush=True)
                except Exception as error:  # noqa: BLE001 - a trace is a bonus, not a result
                    traceback.print_exc()
                    errors[f"trace {method}"] = f"{type(error).__name__}: {error}"
            results = write_report(args.repeats)
    finally:
        dist.destroy_process_group()
        shutil.rmtree(store, ignore_errors=True)

    bad = [r["method"] for r in results if r.get("step_time_s") is None or not math.isfinite(r["final_loss"])]
    failed = sorted(set(errors) | set(bad))
    if failed:
        print(f"[gpu_bench] failed: {failed}", file=sys.stderr)
        # 3: only the baseline (torch's ZeroRedundancyOptimizer, the one user of NCCL here) failed
        return 3 if failed == ["zero1"] else 1
    return 0

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
