"""The optimizer's own cost, with no communication: one process, AccoOptimizer in each mode
against plain ``torch.optim.AdamW`` (default and fused) on the same model, measured side by side (interleaved,
repeated, medians). What it shows is the price of the flat buffers, the copies in and out of
the communication buffer and the shard step; with one worker there is nothing to hide.

    python -m benchmarks.overhead --width 1024 --depth 8 --batch 1024 --repeats 3 --json benchmarks/results/overhead.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from acco import AccoOptimizer

METHODS = ("adamw", "adamw-fused", "sync", "dpu", "acco")


def make_model(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers)


def measure(method: str, width: int, depth: int, batch: int, calls: int) -> dict:
    """Median seconds per call: whole call (forward, backward, step, zero_grad) and step alone."""
    model = make_model(width, depth)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True if method == "adamw-fused" else None)
    # AccoOptimizer picks AdamW's fused kernel for its shard by itself when the user left fused=None
    opt = inner if method.startswith("adamw") else AccoOptimizer(inner, mode=method, batch_rule_applied=True)
    x = torch.randn(batch, width)
    whole, step = [], []
    for _ in range(calls):
        start = time.perf_counter()
        model(x).square().mean().backward()
        before_step = time.perf_counter()
        opt.step()
        opt.zero_grad()
        end = time.perf_counter()
        whole.append(end - start)
        step.append(end - before_step)
    if isinstance(opt, AccoOptimizer):
        opt.finish()
        opt.close()
    warm = slice(2, None)  # the first calls allocate state
    return {"call_s": statistics.median(whole[warm]), "step_s": statistics.median(step[warm])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1024, help="rows per micro-batch (think: tokens)")
    parser.add_argument("--calls", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--json", type=Path, default=None, help="write results here (and a .md table beside it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    samples: dict[str, list[dict]] = {m: [] for m in methods}
    for repeat in range(args.repeats):
        for method in methods:  # interleaved, so that drifts in machine load hit every method alike
            samples[method].append(measure(method, args.width, args.depth, args.batch, args.calls))
            print(f"repeat {repeat} {method}: {samples[method][-1]}", file=sys.stderr)
    baseline = statistics.median(s["call_s"] for s in samples[methods[0]])
    results = []
    for method in methods:
        calls = [s["call_s"] for s in samples[method]]
        steps = [s["step_s"] for s in samples[method]]
        results.append({
            "method": method,
            "call_s": statistics.median(calls),
            "call_s_spread": [min(calls), max(calls)],
            "step_s": statistics.median(steps),
            "call_time_vs_first": statistics.median(calls) / baseline,
        })
    params = sum(p.numel() for p in make_model(args.width, args.depth).parameters())
    config = {**vars(args), "json": str(args.json) if args.json else None, "parameters": params,
              "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()}
    report = {"config": config, "results": results}
    text = json.dumps(report, indent=2)
    if args.json is None:
        print(text)
        return 0
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(text + "\n")
    lines = [f"{params / 1e6:.1f}M parameters, batch {args.batch}, {args.threads} thread(s), one process, medians of {args.repeats}",
             "", "| method | s / call | spread | s in step()+zero_grad() | call time vs " + methods[0] + " |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['method']} | {r['call_s']:.4f} | {r['call_s_spread'][0]:.4f}–{r['call_s_spread'][1]:.4f} | {r['step_s']:.4f} | {r['call_time_vs_first']:.2f} |")
    args.json.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
