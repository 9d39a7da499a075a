"""Issue 22 part 1's plot and table: acco's loss gap against batch / B_simple, across setups.

Reads ``benchmarks.gap_by_batch`` reports (several per setup where its batch sizes were run apart) and puts
every measured cell on one axis: sequences per update over the gradient noise scale B_simple that the runs
measured themselves (``acco.noise_scale``). Two gaps per cell: acco − zero1 at zero1's best rate (a user who
keeps the tuned AdamW rate) and acco's best rate against zero1's (a user who tunes acco's rate on the same
grid). The table a user can act on is derived from the cells, not written by hand: the smallest batch /
B_simple above which every measured cell is within the threshold, or none.

Usage::

    python -m benchmarks.gap_vs_noise_scale \\
        --setup tiny=benchmarks/results/gap_by_batch_tiny.json \\
        --setup tiny64u=benchmarks/results/gap_by_batch_tiny64u.json,benchmarks/results/gap_by_batch_tiny64u_256.json \\
        --json benchmarks/results/gap_vs_noise_scale.json
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any, Optional

from .report import markdown_table, write


def load_cells(label: str, paths: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The setup's batch cells (at zero1's best rate) and its fixed-rate pairs, from one or more reports."""
    cells, by_rate = [], []
    for path in paths:
        summary = json.loads(Path(path).read_text())["summary"]
        ratio_of = {}
        for row in summary["batches"]:
            if "gap_mean_percent" not in row:
                continue  # acco did not run at zero1's best rate there yet
            ratio_of[row["batch_per_rank"]] = row["batch_over_b_simple"]
            cells.append({"setup": label, "source": path, **{k: row.get(k) for k in (
                "batch_per_rank", "sequences_per_update", "batch_over_b_simple", "b_simple_zero1", "best_lr", "bracketed",
                "gaps_percent", "gap_mean_percent", "acco_best_lr", "best_vs_best_percent")}})
        for row in summary.get("gap_by_lr", []):
            if row["batch_per_rank"] in ratio_of:
                by_rate.append({"setup": label, "batch_over_b_simple": ratio_of[row["batch_per_rank"]],
                                **{k: row[k] for k in ("batch_per_rank", "lr", "best", "gaps_percent", "gap_mean_percent")}})
    return sorted(cells, key=lambda c: c["batch_over_b_simple"]), by_rate


def threshold_above(cells: list[dict[str, Any]], key: str, within: float) -> Optional[float]:
    """The smallest measured batch / B_simple x such that every cell (of every setup) at x or above has
    |gap| ≤ ``within`` percent; None where there is none. A missing or NaN gap counts as not within; a cell
    whose ratio is not a number cannot be placed and is left out."""
    placed = [c for c in cells if isinstance(c.get("batch_over_b_simple"), (int, float)) and math.isfinite(c["batch_over_b_simple"])]

    def ok(cell: dict[str, Any]) -> bool:
        gap = cell.get(key)
        return gap is not None and abs(gap) <= within  # False for NaN

    for x in sorted({c["batch_over_b_simple"] for c in placed}):
        if all(ok(c) for c in placed if c["batch_over_b_simple"] >= x):
            return x
    return None


def plot(plt: Any, report: dict[str, Any]) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    for i, setup in enumerate(report["setups"]):
        color = f"C{i}"
        cells = [c for c in report["cells"] if c["setup"] == setup]
        xs = [c["batch_over_b_simple"] for c in cells]
        left.plot(xs, [c["gap_mean_percent"] for c in cells], "o-", color=color, label=f"{setup}: at zero1's best rate")
        for c in cells:
            left.plot([c["batch_over_b_simple"]] * len(c["gaps_percent"]), c["gaps_percent"], ".", color=color, alpha=0.5)
        if all(c["best_vs_best_percent"] is not None for c in cells):
            left.plot(xs, [c["best_vs_best_percent"] for c in cells], "s--", color=color, mfc="none",
                      label=f"{setup}: acco's best rate vs zero1's")
        for c in cells:
            left.annotate(f"{c['best_lr']:g}", (c["batch_over_b_simple"], c["gap_mean_percent"]), fontsize=7,
                          xytext=(4, 4), textcoords="offset points", color=color)
        for j, lr in enumerate(sorted({r["lr"] for r in report["by_rate"] if r["setup"] == setup})):
            rows = sorted((r for r in report["by_rate"] if r["setup"] == setup and r["lr"] == lr), key=lambda r: r["batch_over_b_simple"])
            right.plot([r["batch_over_b_simple"] for r in rows], [r["gap_mean_percent"] for r in rows], marker="os^vDx"[j % 6],
                       color=color, ls=("-", "--", ":", "-.")[j % 4], label=f"{setup}, peak lr {lr:g}")
    for ax, title in ((left, "acco − zero1 (final val loss), per cell"), (right, "acco − zero1 at a fixed peak rate")):
        ax.axhline(0, color="k", lw=0.6)
        ax.axhline(report["within_percent"], color="k", lw=0.6, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("sequences per update / B_simple (measured)")
        ax.set_ylabel("gap, %")
        ax.set_title(title)
        ax.legend(fontsize=7)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setup", action="append", required=True, help="LABEL=report.json[,report.json...] (benchmarks.gap_by_batch)")
    p.add_argument("--within", default="0.5,1,2,5", help="gaps, in percent, a user may call 'like ZeRO-1' (the first is the plot's line)")
    p.add_argument("--json", default="benchmarks/results/gap_vs_noise_scale.json")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    cells, by_rate, setups = [], [], []
    for spec in args.setup:
        label, _, paths = spec.partition("=")
        if not label or not paths:
            p.error(f"--setup {spec!r}: expected LABEL=report.json[,report.json...]")
        setups.append(label)
        more_cells, more_rates = load_cells(label, paths.split(","))
        cells += more_cells
        by_rate += more_rates
    tiers = [float(x) for x in args.within.split(",")]
    thresholds = [{"within_percent": w, "at_zero1_best": threshold_above(cells, "gap_mean_percent", w),
                   "tuned": threshold_above(cells, "best_vs_best_percent", w)} for w in tiers]
    report = {"argv": ["python", "-m", "benchmarks.gap_vs_noise_scale", *argv], "setups": setups, "within_percent": tiers[0],
              "thresholds": thresholds, "cells": cells, "by_rate": by_rate}

    def said(x: Optional[float]) -> str:
        return f"≥ {x:.1f}×" if x is not None else "none measured"

    lines = [f"# acco − zero1 against batch / B_simple ({', '.join(setups)})", "",
             "Reproduce: `" + shlex.join(report["argv"]) + "` (the inputs: their own reproduce lines).", "",
             "Each cell: final validation loss (updates and ranks as in each input report), paired by seed, from `benchmarks.gap_by_batch` (the "
             "simulator, held to AccoOptimizer; its reports list the real optimizer's confirmations). *B_simple*: the gradient "
             "noise scale in sequences, measured by zero1's runs at its best rate (median over the second half of training).", "",
             markdown_table(["setup", "batch/rank", "sequences/update", "B_simple", "batch / B_simple", "zero1's best rate",
                             "gap there (mean)", "per seed", "acco's best rate", "acco's best vs zero1's best"],
                            [[c["setup"], c["batch_per_rank"], c["sequences_per_update"], f"{c['b_simple_zero1']:.0f}",
                              f"{c['batch_over_b_simple']:.2f}", f"{c['best_lr']:g}" + ("" if c["bracketed"] else " (edge)"),
                              f"{c['gap_mean_percent']:+.2f}%", ", ".join(f"{g:+.2f}" for g in c["gaps_percent"]),
                              "–" if c["acco_best_lr"] is None else f"{c['acco_best_lr']:g}",
                              "–" if c["best_vs_best_percent"] is None else f"{c['best_vs_best_percent']:+.2f}%"] for c in cells]),
             "", "## What a user can read from it", "",
             "The smallest measured batch / B_simple from which on every measured cell, of every setup, is within the gap "
             "(the mean over seeds; *none measured*: no such batch size, the largest cell is not within). This is not whether "
             "single cells below it are within. *Tuning acco's rate*: acco's best among the rates it ran at that batch "
             "size (see each input report), against zero1's best.", "",
             markdown_table(["acco − zero1 within", "keeping ZeRO-1's tuned rate", "tuning acco's rate on the same grid"],
                            [[f"{t['within_percent']:g}%", said(t["at_zero1_best"]), said(t["tuned"])] for t in thresholds]), "",
             "## The gap at a fixed peak rate", "",
             markdown_table(["setup", "peak lr", *[f"batch/rank {b}" for b in sorted({r['batch_per_rank'] for r in by_rate})]],
                            [[setup, f"{lr:g}", *[next((f"{r['gap_mean_percent']:+.2f}% ({r['batch_over_b_simple']:.1f}×)"
                                                        + (" best" if r["best"] else "") for r in by_rate
                                                        if r["setup"] == setup and r["lr"] == lr and r["batch_per_rank"] == b), "–")
                                                  for b in sorted({r['batch_per_rank'] for r in by_rate})]]
                             for setup in setups for lr in sorted({r["lr"] for r in by_rate if r["setup"] == setup})]),
             "", "*best*: zero1's best rate at that batch size. In brackets: batch / B_simple.", ""]
    if cells:
        lines.append(f"Seeds per cell: {statistics.median(len(c['gaps_percent']) for c in cells):.0f} (median).")
    write(Path(args.json), report, "\n".join(lines), plot=plot, make_plot=not args.no_plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
