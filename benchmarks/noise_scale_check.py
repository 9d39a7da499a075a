"""Issue 22 part 3: is the gradient noise scale from an update's two halves right? A check in the simulator.

``acco.noise_scale`` estimates tr(Σ), |G|² and B_simple = tr(Σ)/|G|² from the two halves' averaged
gradients that every ACCO update already holds. This script trains with ``benchmarks.estimate_study``'s
simulation of the ACCO equations (held to ``AccoOptimizer`` there; its ``acco`` or ``sync`` rule),
computes that estimate at every update from the two halves (ḡ₁ at θ̃ₜ, ḡ₂ at θₜ: what the real round
would see) and keeps the ratio-of-averages EMA a user would read. At a few updates it stops (reading
only, the run is unchanged) and measures at the committed parameters θₜ:

* **direct**: tr(Σ) and |G|² from K micro-batch gradients of m sequences each, drawn from streams the
  training never uses: tr(Σ_micro) = Σₖ|gₖ − ḡ|²/(K − 1) (unbiased sample variance), |G|² = |ḡ|² −
  tr(Σ_micro)/K, tr(Σ) per sequence = m·tr(Σ_micro). Its standard error: the spread of the same
  estimate over 8 disjoint groups of K/8 micro-batches, over √8. This is the reference.
* **pairs at θₜ** (``sync`` halves): the two-halves estimator averaged over R fresh pairs of halves,
  both at θₜ: it must match the direct estimate (the estimator is unbiased).
* **pairs at θ̃ₜ, θₜ** (``acco`` halves): the same with the first half at the estimate θ̃ₜ, as acco
  computes it. The difference from the line above is the bias of the estimate's offset (ḡ₁ − ḡ₂
  also holds G(θ̃ₜ) − G(θₜ); acco/noise_scale.py, "ACCO's caveat").
* **this update** and **EMA**: the single update's estimate and the EMA (β = ``--beta``) of the run,
  both over the whole run up to this update: what ``last_round`` would report.

Units: sequences (each sequence's loss is a mean over its tokens; × block size for tokens). The halves
are ``--world`` × ``batch/2`` sequences each.

Usage::

    OMP_NUM_THREADS=1 python -m benchmarks.noise_scale_check --model tiny --lr 2e-3 --seeds 1,2 \\
        --json benchmarks/results/noise_scale_check_tiny.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from acco.noise_scale import NoiseScale, NoiseScaleEMA, b_simple, estimate_from_halves
from benchmarks.convergence import lr_at
from benchmarks.estimate_study import Simulation, _flat
from benchmarks.gpt import Batches, count_parameters, load_corpus

GROUPS = 8  # disjoint groups of the direct estimate's micro-batches, for its standard error


def _rel(a: float, b: float) -> float:
    return a / b - 1 if b not in (0.0,) and math.isfinite(a) and math.isfinite(b) else math.nan


def direct_estimate(sim: Simulation, theta: list[torch.Tensor], stream: Batches, micro_batches: int) -> dict[str, float]:
    """tr(Σ) per sequence, |G|² and B_simple at ``theta`` from ``micro_batches`` gradients of
    ``stream.batch_size`` sequences, with standard errors from GROUPS disjoint groups."""
    if micro_batches % GROUPS or micro_batches // GROUPS < 2:
        raise ValueError(f"--direct-micro-batches must be a multiple of {GROUPS}, at least {2 * GROUPS}")
    m, per_group = stream.batch_size, micro_batches // GROUPS
    sums: list[torch.Tensor] = []
    squares: list[float] = []
    for _ in range(GROUPS):
        total, square = None, 0.0
        for _ in range(per_group):
            g = _flat(sim.gradient(theta, stream.next()))
            total = g if total is None else total.add_(g)
            square += float(g.square().sum())
        sums.append(total)
        squares.append(square)

    def moments(total: torch.Tensor, square: float, k: int) -> tuple[float, float]:
        mean_square = float((total / k).square().sum())
        trace_micro = (square - k * mean_square) / (k - 1)
        return m * trace_micro, mean_square - trace_micro / k

    groups = [moments(s, q, per_group) for s, q in zip(sums, squares)]
    trace, square = moments(torch.stack(sums).sum(0), sum(squares), micro_batches)
    se = [statistics.stdev(values) / math.sqrt(GROUPS) for values in zip(*groups)]
    return {"trace_sigma": trace, "grad_square": square, "b_simple": b_simple(trace, square),
            "trace_sigma_se": se[0], "grad_square_se": se[1], "micro_batches": micro_batches, "sequences_per_micro_batch": m,
            "groups": groups}


def _summary(out: list[NoiseScale]) -> dict[str, Any]:
    """Mean of tr(Σ) and |G|² over pairs, their ratio, standard errors, and one pair's spread."""
    pairs = len(out)
    trace = statistics.fmean(e.trace_sigma for e in out)
    square = statistics.fmean(e.grad_square for e in out)
    return {"trace_sigma": trace, "grad_square": square, "b_simple": b_simple(trace, square),
            "trace_sigma_se": statistics.stdev(e.trace_sigma for e in out) / math.sqrt(pairs),
            "grad_square_se": statistics.stdev(e.grad_square for e in out) / math.sqrt(pairs),
            "single_trace_sigma_rel_sd": statistics.stdev(e.trace_sigma for e in out) / trace if trace else math.nan,
            "single_grad_square_rel_sd": statistics.stdev(e.grad_square for e in out) / abs(square) if square else math.nan,
            "single_unresolved": sum(not e.resolved for e in out) / pairs}


def pairs_estimate(sim: Simulation, estimate: Optional[list[torch.Tensor]], theta: list[torch.Tensor], stream: Batches,
                   pairs: int, half: int) -> dict[str, Any]:
    """The two-halves estimator over ``pairs`` fresh pairs of halves of ``half`` sequences each: both
    halves at ``theta`` (``sync``), and, given the ``estimate`` θ̃ₜ, the first half's same sequences
    at θ̃ₜ (``acco``, as acco computes it). Paired on the same sequences, so that their ratio (the
    bias of the estimate's offset) is measured far more precisely than either alone."""
    sync, acco = [], []
    for _ in range(pairs):
        first, second = stream.next(), stream.next()
        g2 = _flat(sim.gradient(theta, second))
        sync.append(estimate_from_halves(_flat(sim.gradient(theta, first)), g2, half, half))
        if estimate is not None:
            acco.append(estimate_from_halves(_flat(sim.gradient(estimate, first)), g2, half, half))
    out = {"sync": _summary(sync)}
    if acco:
        out["acco"] = _summary(acco)
        ratios = {}
        for key in ("trace_sigma", "grad_square"):
            diff = [getattr(a_, key) - getattr(s_, key) for a_, s_ in zip(acco, sync)]
            ratios[key + "_bias"] = statistics.fmean(diff) / out["sync"][key] if out["sync"][key] else math.nan
            ratios[key + "_bias_se"] = statistics.stdev(diff) / math.sqrt(pairs) / abs(out["sync"][key]) if out["sync"][key] else math.nan
        out["acco_vs_sync"] = ratios
    return out


def _as_dict(e: Optional[NoiseScale]) -> Optional[dict[str, float]]:
    return None if e is None else {"trace_sigma": e.trace_sigma, "grad_square": e.grad_square, "b_simple": e.b_simple}


def run(rule: str, args: argparse.Namespace, seed: int, corpus: Any) -> dict[str, Any]:
    """One training run of ``rule``, the update loop of ``benchmarks.estimate_study.run`` for its
    ``acco`` and ``sync`` rules, with the estimator beside it. ``zero1`` is ``sync`` at zero1's rates
    (update t at lr(t/U), as ``benchmarks.convergence`` steps zero1; ``sync`` steps at acco's commit
    rates, half an update later): plain ZeRO-1 on the same sequences as acco."""
    if rule not in ("acco", "sync", "zero1"):
        raise ValueError(f"rule must be acco, sync or zero1, got {rule!r}")
    sim = Simulation(args, seed, corpus)
    half = args.world * (args.batch_size // 2)  # sequences per half
    block = sim.config.block_size
    direct_stream = Batches(corpus.train, block, args.direct_sequences, seed + 104_729, 0)
    pair_stream = Batches(corpus.train, block, half, seed + 130_363, 0)
    checks = {int(x) for x in args.check_at.split(",")} if args.check_at else set()
    ends = [int(x) for x in args.windows.split(",")] if getattr(args, "windows", "") else []
    ends = [end for end in ends if args.window_size - 1 <= end < args.updates]  # whole windows only
    in_window = {u for end in ends for u in range(end - args.window_size + 1, end + 1)} - checks
    direct_per_update: list[dict[str, Any]] = []
    ema = NoiseScaleEMA(args.beta)
    budget_calls = 2 * args.updates
    estimate = [t.clone() for t in sim.theta]
    per_update: list[dict[str, Any]] = []
    checkpoints: list[dict[str, Any]] = []
    curve: list[dict[str, float]] = []
    start, probe_s = time.perf_counter(), 0.0
    for t in range(args.updates):
        lr_estimate = lr_at((2 * t) / budget_calls, args.lr, args.warmup_fraction)
        lr_commit = lr_at((2 * t + (rule != "zero1")) / budget_calls, args.lr, args.warmup_fraction)
        first = sim.next_half()
        point = estimate if rule == "acco" else sim.theta
        probe: Optional[dict[str, Any]] = None
        if t in checks:  # read-only: own streams, the model's parameters are overwritten by every gradient
            probe_start = time.perf_counter()
            theta = [x.clone() for x in sim.theta]
            pairs = pairs_estimate(sim, [x.clone() for x in estimate] if rule == "acco" else None, theta, pair_stream, args.pairs, half)
            probe = {"update": t, "direct": direct_estimate(sim, theta, direct_stream, args.direct_micro_batches),
                     "pairs_sync": pairs["sync"], "pairs_acco": pairs.get("acco"), "acco_vs_sync": pairs.get("acco_vs_sync")}
            direct_per_update.append({"update": t, **probe["direct"]})
            probe_s += time.perf_counter() - probe_start
        elif t in in_window:  # a window's direct estimate at every update, smaller
            probe_start = time.perf_counter()
            direct_per_update.append({"update": t, **direct_estimate(sim, [x.clone() for x in sim.theta], direct_stream, args.window_micro_batches)})
            probe_s += time.perf_counter() - probe_start
        g1 = sim.gradient(point, first)
        if rule == "acco":
            new_estimate = sim.tentative(g1, lr_estimate)
        g2 = sim.gradient(sim.theta, sim.next_half())
        single = estimate_from_halves(_flat(g1), _flat(g2), half, half)
        average = ema.update(single)
        per_update.append({"update": t, **(_as_dict(single) or {}), "ema": _as_dict(average)})
        if probe is not None:
            probe["this_update"], probe["ema"] = _as_dict(single), _as_dict(average)
            checkpoints.append(probe)
            d = probe["direct"]
            print(f"[{rule} {args.model} seed {seed}] update {t}: direct B {d['b_simple']:.1f} "
                  f"(trΣ {d['trace_sigma']:.3g} ± {d['trace_sigma_se']:.2g}, |G|² {d['grad_square']:.3g} ± {d['grad_square_se']:.2g}); "
                  f"pairs sync {probe['pairs_sync']['b_simple']:.1f}"
                  + (f", pairs acco {probe['pairs_acco']['b_simple']:.1f}" if probe["pairs_acco"] else "")
                  + f"; EMA {average.b_simple if average else math.nan:.1f}", file=sys.stderr, flush=True)
        sim.commit([(a + b) / 2 for a, b in zip(g1, g2)], lr_commit)
        if rule == "acco":
            estimate = new_estimate
        if (t + 1) % args.eval_every == 0 or t + 1 == args.updates:
            last = t + 1 == args.updates
            curve.append({"updates": t + 1, "val_loss": sim.validation_loss(args.eval_batches * (4 if last else 1))})
    return {"rule": rule, "model": args.model, "lr": args.lr, "seed": seed, "batch_size": args.batch_size, "world": args.world,
            "half_sequences": half, "block_size": block, "parameters": count_parameters(sim.model),
            "final_val_loss": curve[-1]["val_loss"], "curve": curve, "checkpoints": checkpoints, "per_update": per_update,
            "direct_per_update": direct_per_update, "windows": ends, "window_size": args.window_size if ends else None,
            "wall_s": time.perf_counter() - start, "probe_s": probe_s}


def _fmt(x: float, digits: int = 3) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def _pct(x: float) -> str:
    return "–" if not math.isfinite(x) else f"{100 * x:+.0f}%"


def emas(per_update: list[dict[str, Any]], beta: float) -> list[Optional[NoiseScale]]:
    """The ratio-of-averages EMA with decay ``beta`` after each update, from the run's own estimates."""
    ema = NoiseScaleEMA(beta)
    return [ema.update(NoiseScale(u["trace_sigma"], u["grad_square"], u["b_simple"], 1.0, 1.0)) for u in per_update]


def _relative_se(d: dict[str, float]) -> float:
    """Relative standard error of the direct B_simple (first order, the two errors independent)."""
    if not (d["trace_sigma"] > 0 and d["grad_square"] > 0):
        return math.nan
    return math.hypot(d["trace_sigma_se"] / d["trace_sigma"], d["grad_square_se"] / d["grad_square"])


def window_comparison(run: dict[str, Any], end: int, weights: Optional[float]) -> dict[str, float]:
    """Over the window of updates ending at ``end``: B = Σw·tr(Σ) / Σw·|G|² from the direct estimates
    at every update (with a standard error over their 8 groups) and from the run's own two-halves
    estimates, with the same weights w: 1 (``weights`` None) or βᵉⁿᵈ⁻ᵗ (an EMA truncated to the window)."""
    size = run["window_size"]
    updates = range(end - size + 1, end + 1)
    direct = {d["update"]: d for d in run["direct_per_update"]}
    halves = {u["update"]: u for u in run["per_update"]}
    w = {t: 1.0 if weights is None else weights ** (end - t) for t in updates}

    def ratio(pairs: list[tuple[float, float, float]]) -> float:
        return b_simple(math.fsum(w_ * a for w_, a, _ in pairs), math.fsum(w_ * b for w_, _, b in pairs))

    truth = ratio([(w[t], direct[t]["trace_sigma"], direct[t]["grad_square"]) for t in updates])
    groups = [ratio([(w[t], direct[t]["groups"][g][0], direct[t]["groups"][g][1]) for t in updates]) for g in range(GROUPS)]
    finite = [x for x in groups if math.isfinite(x)]
    # Each group has 1/8 of the samples: the spread of the 8 group ratios over √8 is the whole one's standard error.
    se = statistics.stdev(finite) / math.sqrt(len(finite)) if len(finite) > 1 else math.nan
    mine = ratio([(w[t], halves[t]["trace_sigma"], halves[t]["grad_square"]) for t in updates])
    out = {"direct_b": truth, "direct_b_rel_se": se / truth if truth else math.nan, "halves_b": mine, "rel": _rel(mine, truth)}
    if weights is None:  # the halves' own standard error, from the per-update differences to the direct estimates
        for key in ("trace_sigma", "grad_square"):
            total = math.fsum(direct[t][key] for t in updates)
            diffs = [halves[t][key] - direct[t][key] for t in updates]
            out[key + "_direct_sum"], out[key + "_halves_sum"] = total, math.fsum(halves[t][key] for t in updates)
            out[key + "_rel"] = math.fsum(diffs) / total if total else math.nan
            out[key + "_rel_se"] = statistics.stdev(diffs) * math.sqrt(len(diffs)) / abs(total) if total else math.nan
        out["halves_b_rel_se"] = math.hypot(out["trace_sigma_rel_se"], out["grad_square_rel_se"])
    return out


def report(runs: list[dict[str, Any]], argv: list[str], target: float, betas: list[float]) -> tuple[str, dict[str, Any]]:
    lines = ["# Gradient noise scale from acco's two halves vs a direct estimate (issue 22 part 3)", "",
             "Reproduce: `OMP_NUM_THREADS=1 PYTHONPATH=. " + " ".join(["python", "-m", "benchmarks.noise_scale_check", *argv]) + "`", "",
             "B_simple = tr(Σ)/|G|² in sequences (× block size for tokens). Two comparisons per run:", "",
             "* **windows** (what a user reads): over W consecutive updates, the direct estimate at *every* update's θₜ "
             "(K micro-batches each, streams the training never uses) against the run's own two-halves estimates of the same "
             "updates, both as Σ tr(Σ) / Σ |G|² with the same weights (plain, or an EMA's βᵉⁿᵈ⁻ᵗ truncated to the window); "
             "and the run's whole EMA at the window's end against the plain window. The true |G|² swings from one update to the "
             "next (the iterate oscillates), so a single θ's B is not what an average of updates can estimate.", "",
             "* **checkpoints** (the estimator at one θ): *direct*: K micro-batches at θₜ (± standard error over 8 groups); "
             "*pairs at θₜ*: the two-halves estimator averaged over R fresh pairs, both halves at θₜ; *offset bias*: the same "
             "pairs with the first half's sequences at acco's estimate θ̃ₜ, (acco − sync)/sync for tr(Σ) and |G|², paired, ± "
             "standard error; *this update*: the run's single-update estimate (– where |G|² ≤ 0: B undefined).", ""]
    summary: dict[str, Any] = {"target": target, "betas": betas, "cells": [], "windows": []}
    for r in runs:
        averaged = {beta: emas(r["per_update"], beta) for beta in betas}
        lines += [f"## {r['model']} ({r['parameters'] / 1e6:.2f}M parameters), rule {r['rule']}, peak lr {r['lr']:g}, seed {r['seed']}", "",
                  f"{r['world']} simulated ranks × {r['batch_size']} sequences per update ({r['half_sequences']} per half), "
                  f"block {r['block_size']}; final val loss {r['final_val_loss']:.4f}; {r['wall_s'] / 60:.1f} min "
                  f"({r['probe_s'] / 60:.1f} of them measuring).", ""]
        if r.get("windows"):
            k = {d["micro_batches"] for d in r["direct_per_update"]}
            lines += [f"Windows of {r['window_size']} updates (direct: K = {min(k)} micro-batches of "
                      f"{r['direct_per_update'][0]['sequences_per_micro_batch']} sequences per update, more at checkpoints):", "",
                      "| updates | direct B (rel. SE) | halves, plain: B (vs direct ± SE; its tr(Σ), \\|G\\|² vs direct) | "
                      + " | ".join(f"halves, EMA {beta:g} weights: B (vs direct, same weights)" for beta in betas) + " | "
                      + " | ".join(f"run's EMA {beta:g} at the end (vs direct plain)" for beta in betas) + " |",
                      "|---" * (3 + 2 * len(betas)) + "|"]
            for end in r["windows"]:
                plain = window_comparison(r, end, None)
                row: dict[str, Any] = {"model": r["model"], "rule": r["rule"], "seed": r["seed"], "end": end, "plain": plain}
                cells = [f"{_fmt(plain['halves_b'])} ({_pct(plain['rel'])} ± {100 * plain['halves_b_rel_se']:.0f}; "
                         f"tr(Σ) {_pct(plain['trace_sigma_rel'])}, \\|G\\|² {_pct(plain['grad_square_rel'])})"]
                weighted_cells, full_cells = [], []
                for beta in betas:
                    weighted = window_comparison(r, end, beta)
                    row[f"ema_weights_{beta:g}"] = weighted
                    weighted_cells.append(f"{_fmt(weighted['halves_b'])} ({_pct(weighted['rel'])}; direct {_fmt(weighted['direct_b'])})")
                    e = averaged[beta][end]
                    row[f"run_ema_{beta:g}_rel"] = _rel(e.b_simple, plain["direct_b"]) if e else math.nan
                    full_cells.append(f"{_fmt(e.b_simple) if e else '–'} ({_pct(row[f'run_ema_{beta:g}_rel'])})")
                summary["windows"].append(row)
                lines.append(f"| {end - r['window_size'] + 1}–{end} | {_fmt(plain['direct_b'])} ({100 * plain['direct_b_rel_se']:.0f}%) | "
                             + " | ".join(cells + weighted_cells + full_cells) + " |")
            lines.append("")
        lines += ["Checkpoints:", "",
                  "| update | direct tr(Σ) | direct \\|G\\|² | direct B (rel. SE) | pairs at θₜ: B | offset bias tr(Σ), \\|G\\|² | this update: B |",
                  "|---" * 7 + "|"]
        for c in r["checkpoints"]:
            d, ps, bias, single = c["direct"], c["pairs_sync"], c.get("acco_vs_sync"), c["this_update"]
            cell: dict[str, Any] = {"model": r["model"], "rule": r["rule"], "seed": r["seed"], "update": c["update"],
                                    "direct_b": d["b_simple"], "direct_b_rel_se": _relative_se(d),
                                    "pairs_sync_rel": _rel(ps["b_simple"], d["b_simple"]),
                                    "pairs_acco_rel": _rel(c["pairs_acco"]["b_simple"], d["b_simple"]) if c.get("pairs_acco") else None,
                                    "single_rel": _rel(single["b_simple"], d["b_simple"]),
                                    "single_trace_sigma_rel_sd": ps["single_trace_sigma_rel_sd"],
                                    "single_grad_square_rel_sd": ps["single_grad_square_rel_sd"]}
            if bias:
                cell.update({k: bias[k] for k in ("trace_sigma_bias", "grad_square_bias")})
            summary["cells"].append(cell)
            bias_cell = (f"{_pct(bias['trace_sigma_bias'])} ± {100 * bias['trace_sigma_bias_se']:.1f}, "
                         f"{_pct(bias['grad_square_bias'])} ± {100 * bias['grad_square_bias_se']:.1f}") if bias else "–"
            lines.append(
                f"| {c['update']} | {_fmt(d['trace_sigma'])} ± {_fmt(d['trace_sigma_se'], 2)} | {_fmt(d['grad_square'])} ± {_fmt(d['grad_square_se'], 2)} "
                f"| {_fmt(d['b_simple'])} ({100 * cell['direct_b_rel_se']:.0f}%) | {_fmt(ps['b_simple'])} ({_pct(cell['pairs_sync_rel'])}) | {bias_cell} "
                f"| {_fmt(single['b_simple'])} |")
        lines.append("")
    lines += ["## Against the target", "", f"|B − B_direct| / B_direct ≤ {100 * target:.0f}% (the issue's criterion):", ""]

    def tally(name: str, values: list[Optional[float]], unit: str) -> dict[str, Any]:
        finite = [abs(v) for v in values if v is not None and math.isfinite(v)]
        within = sum(v <= target for v in finite)
        out = {"n": len(values), "within_target": within, "undefined": len(values) - len(finite),
               "median_abs": statistics.median(finite) if finite else None, "max_abs": max(finite) if finite else None}
        if values:
            lines.append(f"* **{name}**: within {100 * target:.0f}% at {within} of {len(values)} {unit}"
                         + (f" (median |error| {100 * statistics.median(finite):.0f}%, max {100 * max(finite):.0f}%)" if finite else "")
                         + (f"; undefined (|G|² ≤ 0) at {len(values) - len(finite)}" if len(values) > len(finite) else "") + ".")
        return out

    windows = summary["windows"]
    summary["tally"] = {"window_plain": tally("windows, the run's halves vs direct, plain means", [w["plain"]["rel"] for w in windows], "windows")}
    for beta in betas:
        summary["tally"][f"window_ema_weights_{beta:g}"] = tally(f"windows, EMA {beta:g} weights (same for both)",
                                                                  [w[f"ema_weights_{beta:g}"]["rel"] for w in windows], "windows")
    for beta in betas:
        summary["tally"][f"run_ema_{beta:g}"] = tally(f"the run's EMA {beta:g} at a window's end vs the plain window (what a user reads)",
                                                      [w[f"run_ema_{beta:g}_rel"] for w in windows], "windows")
    for key, name in (("trace_sigma", "tr(Σ)"), ("grad_square", "|G|²")):
        if windows:
            direct_total = math.fsum(w["plain"][key + "_direct_sum"] for w in windows)
            halves_total = math.fsum(w["plain"][key + "_halves_sum"] for w in windows)
            se = math.sqrt(math.fsum((w["plain"][key + "_rel_se"] * w["plain"][key + "_direct_sum"]) ** 2 for w in windows)) / direct_total
            summary[f"pooled_{key}"] = {"rel": halves_total / direct_total - 1, "rel_se": se}
            lines.append(f"* **pooled over every window's updates, {name}**: the run's halves (as acco computes them) vs direct "
                         f"{_pct(halves_total / direct_total - 1)} ± {100 * se:.0f}% (standard error).")
    cells = summary["cells"]
    summary["tally"]["pairs_sync"] = tally("checkpoints, the estimator at θₜ (mean of R pairs) vs direct", [c["pairs_sync_rel"] for c in cells], "checkpoints")
    summary["tally"]["pairs_acco"] = tally("checkpoints, as acco computes it (first half at θ̃ₜ, mean of R pairs) vs direct",
                                           [c["pairs_acco_rel"] for c in cells if c["pairs_acco_rel"] is not None], "checkpoints")
    summary["tally"]["single"] = tally("checkpoints, one update alone vs direct", [c["single_rel"] for c in cells], "checkpoints")
    for key, name in (("trace_sigma_bias", "tr(Σ)"), ("grad_square_bias", "|G|²")):
        values = [c[key] for c in cells if key in c]
        if values:
            summary[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
            lines.append(f"* **offset bias of {name}** (first half at θ̃ₜ rather than θₜ, paired): median {_pct(statistics.median(values))}, "
                         f"{_pct(min(values))} to {_pct(max(values))}.")
    for key, name in (("single_trace_sigma_rel_sd", "tr(Σ)"), ("single_grad_square_rel_sd", "|G|²")):
        values = [c[key] for c in cells if math.isfinite(c[key])]
        if values:
            lines.append(f"* one update's spread of {name} (relative standard deviation over the pairs): median {statistics.median(values):.2f}.")
    ses = [w["plain"]["direct_b_rel_se"] for w in windows if math.isfinite(w["plain"]["direct_b_rel_se"])]
    ses += [c["direct_b_rel_se"] for c in cells if math.isfinite(c["direct_b_rel_se"])]
    if ses:
        lines.append(f"* the references' own relative standard error on B: median {100 * statistics.median(ses):.0f}%, max {100 * max(ses):.0f}%.")
    return "\n".join(lines) + "\n", summary


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--world", type=int, default=2, help="simulated ranks (their data streams)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per rank per update (half per call)")
    p.add_argument("--updates", type=int, default=400)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (tiny: zero1's best 2e-3; small: 1e-3)")
    p.add_argument("--seeds", default="1")
    p.add_argument("--rules", default="acco", help="acco, sync and/or zero1")
    p.add_argument("--check-at", default="50,100,150,200,275,350,399", help="updates (0-based) at which to measure directly")
    p.add_argument("--direct-micro-batches", type=int, default=256, help="K: micro-batch gradients of the direct estimate (multiple of 8)")
    p.add_argument("--direct-sequences", type=int, default=8, help="m: sequences per micro-batch of the direct estimate")
    p.add_argument("--pairs", type=int, default=32, help="R: fresh pairs of halves per checkpoint (3 backward passes each with rule acco)")
    p.add_argument("--windows", default="150,275,399",
                   help="updates ending the windows over which the run's estimates are compared with a direct estimate at every update")
    p.add_argument("--window-size", type=int, default=40, help="updates per window")
    p.add_argument("--window-micro-batches", type=int, default=32, help="K of the direct estimate at each update of a window (multiple of 8)")
    p.add_argument("--beta", type=float, default=0.95, help="the EMA's decay per update (printed while running)")
    p.add_argument("--report-betas", default="0.9,0.95,0.98", help="EMA decays compared in the report (from the per-update estimates)")
    p.add_argument("--target", type=float, default=0.2, help="relative error the issue asks for")
    p.add_argument("--warmup-fraction", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--val-seed", type=int, default=None)
    p.add_argument("--data", default=None)
    p.add_argument("--max-bytes", type=int, default=4_000_000)
    p.add_argument("--json", default="benchmarks/results/noise_scale_check.json")
    p.add_argument("--report-only", action="store_true", help="write the report from <json stem>.runs.jsonl; train nothing")
    args = p.parse_args(argv)  # threads: OMP_NUM_THREADS=1 in the reports' commands (set here, it would leak into callers)
    corpus = load_corpus(args.data, args.max_bytes)
    runs_path = Path(args.json).with_suffix(".runs.jsonl")
    runs_path.parent.mkdir(parents=True, exist_ok=True)
    runs = [json.loads(line) for line in runs_path.read_text().splitlines()] if runs_path.exists() else []
    for seed in [] if args.report_only else [int(x) for x in args.seeds.split(",")]:
        for rule in args.rules.split(","):
            if any(r["rule"] == rule and r["seed"] == seed and r["model"] == args.model and r["lr"] == args.lr
                   and r["batch_size"] == args.batch_size for r in runs):
                continue
            out = run(rule, args, seed, corpus)
            runs.append(out)
            with runs_path.open("a") as f:
                f.write(json.dumps(out) + "\n")
    mine = [r for r in runs if r["model"] == args.model]
    if args.report_only and Path(args.json).exists():  # keep the command that made the runs
        argv = json.loads(Path(args.json).read_text()).get("argv", argv)
    text, summary = report(mine, argv, args.target, [float(x) for x in args.report_betas.split(",")])
    compact = [{k: v for k, v in r.items() if k not in ("per_update", "direct_per_update")} for r in mine]  # in the .runs.jsonl
    write_reports(args.json, argv, summary, compact, text)
    return 0


def write_reports(json_path: str, argv: Any, summary: Any, runs: list[dict[str, Any]], text: str) -> None:
    """The JSON (the command, the summary, the runs without their per-update series, which the .runs.jsonl
    keeps) and the Markdown report beside it; the report is also printed."""
    Path(json_path).write_text(json.dumps({"argv": argv, "summary": summary, "runs": runs}, indent=1))
    Path(json_path).with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    raise SystemExit(main())
