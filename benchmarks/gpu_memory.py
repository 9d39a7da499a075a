"""Peak memory against the README's formula: one process, world size 1, a model of a few GB.

``memory_bytes()`` reports what the optimizer holds; a temporary allocated and freed inside a round
does not show there, and on an 80 GB card it is what fails. So this measures the allocator's peak
(``benchmarks/peak.py``: ``torch.cuda.max_memory_allocated`` on a GPU; on CPU the profiler's
allocation events, with ``engine="stream"`` so that rounds run in the measured thread) and holds
each reading to a bound computed from the README's formula, not from the optimizer:

* **held**: ``memory_bytes()["total"]`` against the formula's lines (P parameters, S = P at world 1,
  b / c / m the parameter, communication and master bytes, AdamW's k = 2, mode acco);
* **round**: the peak over each ``step()`` (a round), above what was allocated when it began, in the
  steady state, against the formula's round transient (the norm's float64 piece: 8·min(S, 2²²));
* **run**: the peak over whole calls (forward, backward, step) above what acco holds, against
  compute_only's peak over the same calls above its parameters (activations, and its P·b gradients,
  which acco holds already: the bound is loose by up to P·b) + one parameter's gradient (autograd
  adds each new gradient into ``p.grad``) + the round transient.

Each check allows a slack (CUDA: 64 MiB; CPU: 64 KiB) for allocator rounding and small tensors. Exit
code 1 if a check fails (and the table says which).

    python -m benchmarks.gpu_memory --device cuda --json benchmarks/results/gpu_memory.json   # 64 × 4096²: 1.07B on an 80 GB card
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from acco import AccoOptimizer

from .peak import AllocationPeak

K_ADAMW = 2
NORM_CHUNK = 1 << 22  # the README's piece of the float64 norm


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=0,
                   help="Linear(width, width) layers, no bias (0: as many as fill about half the GPU with what acco holds, at most 64)")
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--rows", type=int, default=1024, help="rows of the input per step() call")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="parameter dtype (the master is fp32)")
    p.add_argument("--calls", type=int, default=8, help="measured calls, after 4 warm-up calls")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/gpu_memory.json"))
    args = p.parse_args(argv)
    if min(args.width, args.rows, args.calls) < 1 or args.layers < 0:
        p.error("--width, --rows and --calls must be >= 1, --layers >= 0")
    return args


def auto_layers(args: argparse.Namespace, device: torch.device) -> int:
    """About half the GPU for what acco holds at world 1 (42 bytes per bf16 parameter, 48 in fp32)."""
    if device.type != "cuda":
        return 4
    per_param = 42 if args.dtype == "bf16" else 48
    total = torch.cuda.get_device_properties(device).total_memory
    return max(1, min(64, int(0.5 * total / (per_param * args.width * args.width))))


def build_model(args: argparse.Namespace, device: torch.device) -> nn.Module:
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    layers = [nn.Linear(args.width, args.width, bias=False, device=device, dtype=dtype) for _ in range(args.layers)]
    for layer in layers:
        nn.init.normal_(layer.weight, std=args.width**-0.5)
    return nn.Sequential(*[m for layer in layers for m in (layer, nn.Tanh())])


def formula(numel: int, b: int, c: int, m: int, k: int = K_ADAMW) -> dict[str, int]:
    """The README's table at world size 1 (S = P), mode acco, AdamW."""
    s = numel
    lines = {
        "params": numel * b, "grads": numel * b, "comm": numel * max(b, c),
        "master_shard": s * m, "grad_shard": s * m, "optimizer_state": k * s * m,
        "estimate_carry": s * m, "estimate_backup": (1 + k) * s * m,
        "dtype_conversion": (s * c if c != m else 0) + (s * b if b != m else 0),
    }
    lines["total"] = sum(lines.values())
    lines["round_transient"] = 8 * min(s, NORM_CHUNK)
    return lines


def one_call(model: nn.Module, x: torch.Tensor, opt: Optional[AccoOptimizer], round_peaks: Optional[list[int]], device: torch.device) -> torch.Tensor:
    loss = model(x).float().square().mean()
    loss.backward()
    if opt is None:
        model.zero_grad(set_to_none=True)
        return loss.detach()
    if round_peaks is None:
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    with AllocationPeak(device) as peak:
        opt.step()
        opt.zero_grad(set_to_none=True)
    round_peaks.append(peak.peak_bytes)
    return loss.detach()


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def measure(args: argparse.Namespace, device: torch.device, method: str) -> dict[str, Any]:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model = build_model(args, device)
    params_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    dtype = next(model.parameters()).dtype
    x = torch.randn(args.rows, args.width, device=device, dtype=dtype)
    opt = None
    if method == "acco":
        opt = AccoOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-4), mode="acco", max_grad_norm=1.0,
                            **({"engine": "stream"} if device.type == "cpu" else {}))
    start = time.perf_counter()
    for _ in range(4):  # optimizer state, estimate shadow and carry are created by these calls
        one_call(model, x, opt, None, device)
    with AllocationPeak(device) as run:  # whole calls (measurements are never nested: each resets the peak)
        for _ in range(args.calls):
            loss = one_call(model, x, opt, None, device)
    round_peaks: list[int] = []
    if opt is not None:  # each step() alone
        for _ in range(args.calls):
            loss = one_call(model, x, opt, round_peaks, device)
    out: dict[str, Any] = {
        "method": method, "parameters": sum(p.numel() for p in model.parameters()), "params_bytes": params_bytes,
        # the peak above what was allocated when the calls began (the model, and acco's held buffers)
        "run_peak_above_start_bytes": run.peak_bytes, "seconds": time.perf_counter() - start,
        "final_loss": float(loss),
    }
    if opt is not None:
        out["memory_bytes"] = opt.memory_bytes()
        out["round_peaks_bytes"] = round_peaks
        out["master_dtype"] = str(opt._shard.master.dtype)
        out["engine"] = opt.engine
        opt.finish()
        opt.close()
    del model, opt, x
    gc.collect()
    return out


def checks(compute: dict[str, Any], acco: dict[str, Any], b: int, slack: int) -> list[dict[str, Any]]:
    numel = acco["parameters"]
    f = formula(numel, b, b, 4)
    held = acco["memory_bytes"]
    rows = []

    def check(name: str, measured: int, bound: int, what: str) -> None:
        rows.append({"check": name, "measured_bytes": measured, "bound_bytes": bound, "slack_bytes": slack,
                     "passed": measured <= bound + slack, "what": what})

    check("held", held["total"], f["total"], "memory_bytes()['total'] vs the formula's lines")
    check("round", max(acco["round_peaks_bytes"]), f["round_transient"], "allocator peak over a step() vs 8·min(S, 2^22)")
    run_bound = compute["run_peak_above_start_bytes"] + acco["largest_param_bytes"] + f["round_transient"]
    check("run", acco["run_peak_above_start_bytes"], run_bound,
          "allocator peak over forward+backward+step above what acco holds vs compute_only's (above its parameters) + one gradient + round transient")
    return rows


def markdown(result: dict[str, Any]) -> str:
    c = result["config"]
    lines = [
        f"**{c['device_name']}**, torch {c['torch']}, {c['parameters'] / 1e9:.3f}B parameters ({c['layers']} × Linear({c['width']}, "
        f"{c['width']}), {c['dtype']} parameters, fp32 master), {c['rows']} rows per call, mode acco, AdamW, clipping; world size 1. "
        "MiB; bounds from the README's formula (see `benchmarks/gpu_memory.py`).", "",
        "| check | measured | bound | slack | passed | what |", "|---|---|---|---|---|---|",
    ]
    for row in result["checks"]:
        lines.append(f"| {row['check']} | {row['measured_bytes'] / 2**20:.1f} | {row['bound_bytes'] / 2**20:.1f} | "
                     f"{row['slack_bytes'] / 2**20:.2f} | {'yes' if row['passed'] else '**no**'} | {row['what']} |")
    held = result["acco"]["memory_bytes"]
    lines += ["", "memory_bytes(): " + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in held.items()) + " (MiB)"]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    if args.layers == 0:
        args.layers = auto_layers(args, device)
    compute = measure(args, device, "compute_only")
    acco = measure(args, device, "acco")
    acco["largest_param_bytes"] = args.width * args.width * (2 if args.dtype == "bf16" else 4)
    b = 2 if args.dtype == "bf16" else 4
    slack = 64 << 20 if device.type == "cuda" else 64 << 10
    result = {
        "config": {"device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
                   "layers": args.layers, "width": args.width, "rows": args.rows, "dtype": args.dtype, "calls": args.calls,
                   "parameters": acco["parameters"], "argv": ["python", "-m", "benchmarks.gpu_memory", *(argv or sys.argv[1:])]},
        "compute_only": compute, "acco": acco, "formula": formula(acco["parameters"], b, b, 4),
    }
    result["checks"] = checks(compute, acco, b, slack)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    args.json.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    failed = [r["check"] for r in result["checks"] if not r["passed"]]
    ok = not failed and math.isfinite(acco["final_loss"]) and acco["master_dtype"] == "torch.float32"
    if not ok:
        print(f"[gpu_memory] FAILED: {failed or 'loss or master dtype'}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
