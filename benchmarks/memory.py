"""Report 2: memory per rank, held against the README's formula.

Each (world size, method) runs in fresh processes (one launch each), so that one method's freed
memory, kept by the allocator, never inflates another's peak. Per rank: the resident set after
the model and corpus are loaded (baseline), the peak resident set while training a few calls
(``VmHWM``, reset right before the optimizer is built; the ranks run with glibc's
``MALLOC_MMAP_THRESHOLD_`` fixed at 128 KiB so that freed blocks leave the resident set at once: set
it yourself under torchrun), and the bytes the method's own training
state takes, by buffer (``AccoOptimizer.memory_bytes()``; for DDP methods the parameter, gradient
and optimizer-state tensors). The formula, with P trainable elements, S = ⌈P / world⌉, fp32
(b = m = 4 bytes) and AdamW (k = 2 state tensors):

* ddp:   2·P·b + k·P·m   (gradients are views into DDP's buckets: ``gradient_as_bucket_view``)
* zero1: 2·P·b + k·S·m
* acco:  zero1 + P·b (the one communication buffer) + (4 + k)·S·m (master shard, gradient shard,
  estimate carry, estimate backup of master and state) + 2·world·min(2¹⁹, S)·b on gloo (the send and
  receive pieces of the chunked reduce-scatter)

    python -m benchmarks.memory --world 1,2,4 --model medium
"""

from __future__ import annotations

import argparse
import gc
import math
import os
from typing import Any, Optional

import torch
import torch.distributed as dist

from acco.comm import GLOO_CHUNK_ELEMENTS

from . import launcher, ranks, report
from .gpt import MODELS, Batches, build_model, count_parameters, load_corpus, model_config, param_groups
from .methods import build_method, check_methods

DEFAULT_METHODS = "ddp,zero1,acco"
B = M = 4  # fp32 parameter and master bytes
K = 2  # AdamW's state tensors per element
ACCO_METHODS = ("acco", "acco_nonblocking", "dpu", "acco_sync")


def formula_bytes(method: str, numel: int, world: int, padded_shard: Optional[int] = None, gloo: bool = True) -> dict[str, int]:
    """The README's per-rank formula, by term."""
    shard = padded_shard or math.ceil(numel / world)
    # acco on gloo reduce-scatters in pieces spanning GLOO_CHUNK_ELEMENTS over all ranks: send + receive scratch
    scratch = 2 * world * max(1, min(GLOO_CHUNK_ELEMENTS // world, shard)) * B if gloo and world > 1 else 0
    if method == "ddp":
        return {"params": numel * B, "grads": numel * B, "optimizer_state": K * numel * M}
    zero1 = {"params": numel * B, "grads": numel * B, "optimizer_state": K * shard * M}
    if method == "zero1":
        return zero1
    if method in ("acco", "acco_nonblocking"):
        padded = shard * world
        return {"params": padded * B, "grads": padded * B, "optimizer_state": K * shard * M,
                "comm": padded * B, "shard_extras": (4 + K) * shard * M, "collective_scratch": scratch}
    if method == "dpu" or method == "acco_sync":  # no estimate carry or backup
        padded = shard * world
        return {"params": padded * B, "grads": padded * B, "optimizer_state": K * shard * M,
                "comm": padded * B, "shard_extras": 2 * shard * M, "collective_scratch": scratch}
    raise ValueError(f"no formula for {method}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default="1,2,4", help="world sizes, comma-separated")
    p.add_argument("--bandwidth", default="none", help="link rate (memory does not depend on it)")
    p.add_argument("--model", choices=sorted(MODELS), default="medium")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per rank per call (small: activations are not the subject)")
    p.add_argument("--methods", default=DEFAULT_METHODS)
    p.add_argument("--calls", type=int, default=4, help="training calls before reading the peak (2 acco updates)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--one-launch", action="store_true",
                   help="run all methods in one launch per world size (faster; peaks then include what earlier methods left)")
    launcher.add_common_arguments(p, "benchmarks/results/memory.json")
    return p


def rank_main(args: argparse.Namespace) -> Optional[dict[str, Any]]:
    only = launcher.only_method()
    methods = [only] if only else check_methods(args.methods.split(","))
    rank, world = ranks.rank_and_world()
    config = model_config(args.model)
    corpus = load_corpus(None, 300_000)
    rows = []
    for name in methods:
        model = build_model(config, args.seed)
        numel = count_parameters(model)
        batches = Batches(corpus.train, config.block_size, args.batch_size, args.seed, rank)
        _warm_up_runtime(model, batches)
        gc.collect()
        baseline = ranks.rss_bytes()
        ranks.reset_peak_rss()
        method = build_method(name, model, param_groups(model, 0.1), 3e-4)
        for _ in range(args.calls):
            x, y = batches.next()
            method.compute(x, y)
            method.update()
        method.finish()
        peak = ranks.peak_rss_bytes()
        accounted = method.accounted_bytes()
        transient = method.round_transient_bytes() if hasattr(method, "round_transient_bytes") else 0
        shard = getattr(getattr(method, "optimizer", None), "layout", None)
        gloo = dist.is_initialized() and dist.get_backend() == "gloo"
        formula = formula_bytes(name, numel, world, shard.shard_size if shard is not None else None, gloo)
        method.close()
        del method, model
        gathered = ranks.gather_rows([baseline, peak, sum(accounted.values())])
        rows.append({
            "method": name,
            "parameters": numel,
            "baseline_rss_bytes": int(max(g[0] for g in gathered)),
            "peak_rss_bytes": int(max(g[1] for g in gathered)),
            "peak_above_baseline_bytes": int(max(g[1] - g[0] for g in gathered)),
            "accounted_bytes": int(max(g[2] for g in gathered)),
            "accounted_by_buffer": accounted,  # rank 0's
            "round_transient_bytes": transient,  # what a round allocates and frees (memory_bytes())
            "formula_bytes": sum(formula.values()),
            "formula_by_term": formula,
        })
    return {"parameters": rows[0]["parameters"], "rows": rows, "fresh_processes": only is not None,
            "malloc_mmap_threshold": os.environ.get(MMAP_THRESHOLD_ENV)}


def _warm_up_runtime(model: torch.nn.Module, batches: Batches) -> None:
    """Pay torch's one-time costs (autograd engine, kernels, gloo buffers) before the baseline,
    so that they are not charged to whichever method happens to run first."""
    model(*batches.next()).backward()
    model.zero_grad(set_to_none=True)
    ranks.barrier()
    ranks.gather_rows([0.0])


def settings_of(args: argparse.Namespace) -> list[launcher.Setting]:
    methods = check_methods(args.methods.split(","))
    settings = launcher.parse_settings(args.world, args.bandwidth)
    if args.one_launch:
        return settings
    return [launcher.Setting(s.world, s.bandwidth_bps, m) for s in settings for m in methods]


def make_report(args: argparse.Namespace, argv: list[str], partials: list[dict[str, Any]]) -> None:
    results = []
    for part in partials:
        for row in part["rows"]:
            results.append({"world": part["world"], "network": part["network"], "fresh_processes": part["fresh_processes"],
                            "malloc_mmap_threshold": part["malloc_mmap_threshold"], **row})
    numel = partials[0]["parameters"] if partials else 0
    for r in results:  # hold every method against zero1 at the same world size
        zero1 = next((z for z in results if z["method"] == "zero1" and z["world"] == r["world"]), None)
        r["samples_per_s"] = r["step_time_s"] = r["overlap_efficiency"] = r["speedup_vs_zero1"] = None  # not measured here
        r["accounted_within_formula"] = r["accounted_bytes"] <= r["formula_bytes"]
        if zero1 is not None:
            r["peak_vs_zero1_bytes"] = r["peak_rss_bytes"] - zero1["peak_rss_bytes"]
            r["accounted_vs_zero1_bytes"] = r["accounted_bytes"] - zero1["accounted_bytes"]
        if zero1 is not None and r["method"] in ACCO_METHODS:
            terms = r["formula_by_term"]  # one model-sized buffer + shard-sized extras (+ chunk-sized scratch on gloo)
            r["allowed_over_zero1_bytes"] = (terms["comm"] + terms["shard_extras"] + terms["collective_scratch"]
                                             + r.get("round_transient_bytes", 0))  # + a round's own temporaries
            r["peak_within_allowance"] = r["peak_vs_zero1_bytes"] <= r["allowed_over_zero1_bytes"]
    config = report.config(
        "memory", args, argv, numel,
        rss="VmHWM from /proc/self/status, reset (clear_refs 5) right before the optimizer is built; max over ranks; "
            "ranks run with MALLOC_MMAP_THRESHOLD_ fixed (results[].malloc_mmap_threshold) so that RSS follows live bytes",
    )
    data = {"config": config, "results": results}
    report.write(args.json, data, markdown(data), plot, make_plot=not args.no_plot)


def markdown(data: dict[str, Any]) -> str:
    c = data["config"]
    lines = [
        f"Memory per rank: model {c['model']} ({c['parameters'] / 1e6:.1f}M parameters, fp32, AdamW), batch "
        f"{c['batch_size']} × {c['model_config']['block_size']}, {c['calls']} calls; "
        f"{'each method in fresh processes' if all(r['fresh_processes'] for r in data['results']) else 'methods in turn in one launch per world size'}. "
        "MiB; peak = VmHWM (max over ranks); accounted = the method's own training state by buffer; "
        "formula = the README's; allowed over zero1 = one model-sized buffer + (4 + k)·S·m + chunk scratch + a round's "
        "transient (memory_bytes()['round_transient']).", "",
    ]
    rows = []
    for r in data["results"]:
        rows.append([r["world"], r["method"], f"{report.mib(r['baseline_rss_bytes']):.0f}", f"{report.mib(r['peak_rss_bytes']):.0f}",
                     f"{report.mib(r['accounted_bytes']):.1f}", f"{report.mib(r['formula_bytes']):.1f}",
                     _mib_or_none(r.get("accounted_vs_zero1_bytes")), _mib_or_none(r.get("peak_vs_zero1_bytes")),
                     _mib_or_none(r.get("allowed_over_zero1_bytes"))])
    lines.append(report.markdown_table(
        ["world", "method", "baseline RSS", "peak RSS", "accounted", "formula", "accounted − zero1", "peak − zero1", "allowed over zero1"], rows))
    return "\n".join(lines)


def _mib_or_none(value: Optional[int]) -> Optional[str]:
    return None if value is None else f"{report.mib(value):.1f}"


def plot(plt: Any, data: dict[str, Any]) -> None:
    """Accounted bytes (bars) and peak RSS above baseline (dots) per method and world size."""
    results = data["results"]
    worlds = sorted({r["world"] for r in results})
    methods = list(dict.fromkeys(r["method"] for r in results))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        for j, world in enumerate(worlds):
            r = next((r for r in results if r["method"] == method and r["world"] == world), None)
            if r is None:
                continue
            x = j + i * width
            ax.bar(x, report.mib(r["accounted_bytes"]), width, color=f"C{i}", label=method if j == 0 else None)
            ax.plot([x - width / 2, x + width / 2], [report.mib(r["formula_bytes"])] * 2, color="k", lw=1)
            ax.plot(x, report.mib(r["peak_above_baseline_bytes"]), "o", color="k", ms=4, label="peak RSS − baseline" if i == j == 0 else None)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(worlds))], [f"world {w}" for w in worlds])
    ax.set_ylabel("MiB per rank")
    ax.set_title(f"Memory per rank, model {data['config']['model']} (bars: accounted; lines: formula)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


MMAP_THRESHOLD_ENV = "MALLOC_MMAP_THRESHOLD_"


def main(argv: Optional[list[str]] = None) -> int:
    if not ranks.is_rank_process():
        # glibc raises its mmap threshold as large blocks are freed, and then keeps freed memory in
        # the heap: RSS would count dead bytes, differently per method. A fixed threshold makes the
        # ranks return every block of 128 KiB or more at once, so RSS follows the live bytes.
        os.environ.setdefault(MMAP_THRESHOLD_ENV, str(128 * 1024))
    return launcher.main("benchmarks.memory", parser(), argv, settings_of, rank_main, make_report)


if __name__ == "__main__":
    raise SystemExit(main())
