"""Learning-rate sweep at equal samples: final validation loss per (method, peak lr) over seeds,
and acco's estimate error over training.

Every run is one ``benchmarks.convergence`` run (``train()``: same model, schedule, clipping and
batch rule: zero1 and dpu take ``--batch-size`` sequences per rank per call, one update per
call; acco half of them per call, two calls per update), for every peak learning rate in
``--lrs``, every seed in ``--seeds`` and every method in ``--methods``, all in one launch of the
ranks (order: seed, lr, method, so that a stopped sweep has whole seeds). Validation: the same
fixed windows for every run (``--val-seed``), the committed parameters, mean over ranks; the
final loss on 4 × ``--eval-batches`` × 16 windows per rank. With ``--estimate-error`` (on by
default) acco runs record, per committed update t and on rank 0 only, ‖θ̃ₜ − θₜ‖ / ‖θₜ − θₜ₋₁‖
(``convergence.EstimateErrorTrace``) and the rate of that update; the training is unchanged.

The network does not change the losses: the sweep runs on loopback by default.

    python -m benchmarks.lr_sweep --world 2 --network loopback --bandwidth none --model tiny --updates 400 \\
        --lrs 1e-3,2e-3,3e-3,5e-3 --seeds 1,2,3 --methods zero1,acco,dpu

Rank 0 appends each finished run to ``<json stem>.runs.jsonl``; ``--report-only`` (same options)
writes the report from that file, e.g. after a sweep was stopped, or to redraw the plot.
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

from . import convergence, launcher, ranks, report
from .gpt import build_model, count_parameters, load_corpus, model_config
from .methods import check_methods

DEFAULT_LRS = "1e-3,2e-3,3e-3,5e-3"
# Phases of the schedule for the estimate-error summary: the warm-up, then thirds of the rest.
PHASES = ("warm-up", "first third", "second third", "last third")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    convergence.add_training_arguments(p)
    p.add_argument("--lrs", default=DEFAULT_LRS, help="comma-separated peak learning rates")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated; each seed: initial weights and training batches")
    convergence.add_estimate_error_arguments(p, default=True)
    p.add_argument("--report-only", action="store_true", help="write the report from <json stem>.runs.jsonl; train nothing")
    launcher.add_common_arguments(p, "benchmarks/results/lr_sweep.json")
    p.set_defaults(bandwidth="none", network="loopback", eval_every=100, eval_batches=8, val_seed=0,
                   timeout=4 * 3600.0)  # one launch runs the whole sweep
    return p


def runs_path(json_path: Path) -> Path:
    return Path(json_path).with_suffix(".runs.jsonl")


def rank_main(args: argparse.Namespace) -> Optional[dict[str, Any]]:
    rank, world = ranks.rank_and_world()
    setting = launcher.rank_setting()
    corpus = load_corpus(args.data, args.max_bytes, args.data_skip)
    methods = check_methods(args.methods.split(","))
    lrs, seeds = launcher.parse_list(args.lrs, float), launcher.parse_list(args.seeds, int)
    parameters = count_parameters(build_model(model_config(args.model), 0))
    progress = runs_path(args.json) if rank == 0 else None
    if progress is not None:
        progress.parent.mkdir(parents=True, exist_ok=True)
        progress.write_text("")
    total, runs, begin = len(seeds) * len(lrs) * len(methods), [], time.perf_counter()
    for seed in seeds:
        for lr in lrs:
            for name in methods:
                start = time.perf_counter()
                run_args = argparse.Namespace(**{**vars(args), "lr": lr})
                label = f"lr sweep world {world} seed {seed} lr {lr:g}"
                run = {"lr": lr, **convergence.train(name, run_args, seed, corpus, label)}
                run["run_s"] = time.perf_counter() - start  # training and evaluations
                runs.append(run)
                if progress is not None:
                    with progress.open("a") as f:
                        f.write(json.dumps({**setting, "parameters": parameters, **run}) + "\n")
                    done, elapsed = len(runs), time.perf_counter() - begin
                    print(f"[lr sweep] run {done}/{total} ({name}, lr {lr:g}, seed {seed}) took {run['run_s']:.1f} s; "
                          f"{elapsed / 60:.1f} min so far, about {elapsed / done * (total - done) / 60:.1f} min left",
                          file=sys.stderr, flush=True)
    if rank != 0:
        return None
    return {"parameters": parameters, "runs": runs}


# ----------------------------------------------------------------------------- summary
def _stats(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "median": statistics.median(values), "n": len(values)}


def phase_of(update: int, updates: int, warmup_fraction: float) -> str:
    """The schedule phase of update t (1-based): its rounds start at sample fraction (t − 1) / updates."""
    fraction = (update - 1) / updates
    if fraction < warmup_fraction:
        return PHASES[0]
    rest = (fraction - warmup_fraction) / max(1e-9, 1.0 - warmup_fraction)
    return PHASES[1 + min(2, int(3 * rest))]


def estimate_error_summary(run: dict[str, Any], warmup_fraction: float) -> Optional[dict[str, Any]]:
    """Median ratio per phase of one acco run's trace (and over the whole run)."""
    rows = run.get("estimate_error")
    if not rows:
        return None
    by_phase: dict[str, list[float]] = {phase: [] for phase in PHASES}
    for row in rows:
        by_phase[phase_of(row["update"], run["updates"], warmup_fraction)].append(row["ratio"])
    out = {phase: statistics.median(v) if v else None for phase, v in by_phase.items()}
    out["all"] = statistics.median(row["ratio"] for row in rows)
    # absolute sizes: the ratio hardly depends on the rate (Adam's steps scale with it), the distance does
    out["error_norm"] = statistics.median(row["error_norm"] for row in rows)
    out["step_norm"] = statistics.median(row["step_norm"] for row in rows)
    return out


def summarise(runs: list[dict[str, Any]], warmup_fraction: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows per (method, lr) and the gaps against zero1 (at zero1's best rate, and best against best)."""
    methods = list(dict.fromkeys(r["method"] for r in runs))
    lrs = sorted({r["lr"] for r in runs})
    cell = {(m, lr): [r for r in runs if r["method"] == m and r["lr"] == lr] for m in methods for lr in lrs}
    losses = {key: [r["final_val_loss"] for r in mine] for key, mine in cell.items() if mine}
    means = {key: statistics.fmean(v) for key, v in losses.items()}
    speed = {key: statistics.median(r["samples"] / r["train_wall_s"] for r in cell[key]) for key in losses}

    def paired(m: str, lr: float, base_lr: float) -> Optional[dict[str, Any]]:
        """Per seed: the method's loss at lr over zero1's at base_lr, minus 1 (same initial weights and batches)."""
        base = {r["seed"]: r["final_val_loss"] for r in cell.get(("zero1", base_lr), [])}
        gaps = [r["final_val_loss"] / base[r["seed"]] - 1.0 for r in cell[(m, lr)] if r["seed"] in base]
        return _stats(gaps) if gaps else None

    results = []
    for (m, lr), values in losses.items():
        mine = cell[(m, lr)]
        s = _stats(values)
        row = {
            "method": m, "lr": lr, "seeds": sorted(r["seed"] for r in mine),
            "final_val_loss": s["mean"], "final_val_loss_std": s["std"], "final_val_loss_spread": [s["min"], s["max"]],
            "final_val_loss_median": s["median"],
            "final_val_loss_vs_zero1": means[(m, lr)] / means[("zero1", lr)] - 1.0 if ("zero1", lr) in means else None,
            "paired_vs_zero1": paired(m, lr, lr),
            "samples": mine[0]["samples"], "updates": mine[0]["updates"], "calls": mine[0]["calls"],
            "micro_batch": mine[0]["micro_batch"], "tokens_per_update": mine[0]["tokens_per_update"],
            "train_wall_s": statistics.median(r["train_wall_s"] for r in mine),
            "run_s": statistics.median(r.get("run_s", r["train_wall_s"]) for r in mine),
            "samples_per_s": speed[(m, lr)],
            "step_time_s": statistics.median(r["train_wall_s"] / r["calls"] for r in mine),
            "overlap_efficiency": None,  # no compute_only run: see the throughput report (and loopback is no network)
            "speedup_vs_zero1": speed[(m, lr)] / speed[("zero1", lr)] if ("zero1", lr) in speed else None,
            "peak_rss_bytes": None,
        }
        summaries = [x for x in (estimate_error_summary(r, warmup_fraction) for r in mine) if x]
        if summaries:  # median over seeds of each run's median ratio per phase
            row["estimate_error"] = {k: _median_or_none([x[k] for x in summaries]) for k in summaries[0]}
        results.append(row)

    gaps = []
    own_best = {m: min((lr for lr in lrs if (m, lr) in means), key=lambda lr: means[(m, lr)]) for m in methods}
    zero1_best = own_best.get("zero1")
    for m in methods:
        if zero1_best is None or m == "zero1":
            continue
        best = own_best[m]
        at_zero1_best = (m, zero1_best) in means
        gaps.append({
            "method": m,
            "zero1_best_lr": zero1_best, "zero1_best_final_val_loss": means[("zero1", zero1_best)],
            "final_val_loss_at_zero1_best_lr": means[(m, zero1_best)] if at_zero1_best else None,
            "gap_at_zero1_best_lr": means[(m, zero1_best)] / means[("zero1", zero1_best)] - 1.0 if at_zero1_best else None,
            "paired_gap_at_zero1_best_lr": paired(m, zero1_best, zero1_best) if at_zero1_best else None,
            "best_lr": best, "best_final_val_loss": means[(m, best)],
            "gap_best_vs_best": means[(m, best)] / means[("zero1", zero1_best)] - 1.0,
            "paired_gap_best_vs_best": paired(m, best, zero1_best),
            "gap_vs_zero1_at_own_best_lr": means[(m, best)] / means[("zero1", best)] - 1.0 if ("zero1", best) in means else None,
        })
    return results, gaps


def _median_or_none(values: list[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def make_report(args: argparse.Namespace, argv: list[str], partials: list[dict[str, Any]]) -> None:
    results, gaps, runs = [], [], []
    for part in partials:
        setting = report.where(part)
        rows, gap_rows = summarise(part["runs"], args.warmup_fraction)
        results += [{**setting, **row} for row in rows]
        gaps += [{**setting, **row} for row in gap_rows]
        runs += [{**setting, **run} for run in part["runs"]]
    config = report.config(
        "lr_sweep", args, argv, partials[0]["parameters"] if partials else None,
        equal_budget="every method: the same updates and the same sequences per update (acco: half per call, two calls per update)",
        runs_total_s=sum(r.get("run_s", 0.0) for r in runs),
    )
    data = {"config": config, "results": results, "gaps": gaps, "runs": runs}
    report.write(args.json, data, markdown(data), plot, make_plot=not args.no_plot)


def partials_from_runs(path: Path) -> list[dict[str, Any]]:
    """The launches' partial results, rebuilt from rank 0's runs file (one JSON object per line)."""
    partials: dict[tuple, dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        run = json.loads(line)
        setting = {k: run.pop(k) for k in ("world", "bandwidth", "bandwidth_bps", "network")}
        parameters = run.pop("parameters")
        key = tuple(setting.values())
        partials.setdefault(key, {**setting, "parameters": parameters, "runs": []})["runs"].append(run)
    if not partials:
        raise SystemExit(f"no finished runs in {path}")
    return list(partials.values())


# ----------------------------------------------------------------------------- report
def _pct(value: Optional[float]) -> Optional[str]:
    return None if value is None else f"{100 * value:+.2f}%"


def _pct_stats(s: Optional[dict[str, Any]]) -> Optional[str]:
    if s is None:
        return None
    text = f"{100 * s['mean']:+.2f}%"
    if s["n"] > 1:
        text += f" ({100 * s['min']:+.2f} to {100 * s['max']:+.2f})"
    return text


def markdown(data: dict[str, Any]) -> str:
    c = data["config"]
    settings = list(dict.fromkeys((r["world"], r["bandwidth"]) for r in data["results"]))
    lines = [
        f"Learning-rate sweep at equal samples: model {c['model']} ({c['parameters'] / 1e6:.2f}M parameters), "
        f"{c['updates']} updates of {c['batch_size']} sequences × {c['model_config']['block_size']} bytes per rank "
        f"(acco: {c['batch_size'] // 2} per call, 2 calls per update), AdamW (warm-up {c['warmup_fraction']:g}, cosine to 10%), "
        f"weight decay {c['weight_decay']:g}, clip {c['max_grad_norm']:g}; peak lr {c['lrs']}; seeds {c['seeds']}. "
        f"Final validation loss on {4 * c['eval_batches']} × 16 fixed windows per rank (validation seed "
        f"{c['val_seed'] if c['val_seed'] is not None else 'per run'}), the same for every run. "
        f"Sum of run times: {c['runs_total_s'] / 60:.1f} min.",
        "",
        "**Final validation loss per method and peak lr**: mean over seeds, sample standard deviation, min–max; "
        "*vs zero1* = mean / zero1's mean at the same lr − 1; *paired* = per seed (same initial weights and batches), "
        "the method's loss / zero1's − 1: mean (min to max).",
        "",
    ]
    rows = []
    for r in data["results"]:
        lo, hi = r["final_val_loss_spread"]
        std = r["final_val_loss_std"]
        rows.append(([r["world"], r["bandwidth"]] if len(settings) > 1 else []) + [
            r["method"], f"{r['lr']:g}", len(r["seeds"]), f"{r['final_val_loss']:.4f}", "–" if std is None else f"{std:.4f}",
            f"{lo:.4f}–{hi:.4f}", _pct(r["final_val_loss_vs_zero1"]), _pct_stats(r["paired_vs_zero1"]), f"{r['train_wall_s']:.1f}"])
    head = (["world", "bandwidth"] if len(settings) > 1 else []) + [
        "method", "peak lr", "seeds", "final val loss (mean)", "std", "min–max", "vs zero1", "paired vs zero1", "train s"]
    lines += [report.markdown_table(head, rows), ""]
    if data["gaps"]:
        lines += [
            "**Gaps against zero1**: *at zero1's best lr* = both at the rate where zero1's mean is lowest; "
            "*own best* = the method at its own best rate against zero1 at its own (best against best).",
            "",
        ]
        rows = [([g["world"], g["bandwidth"]] if len(settings) > 1 else []) + [
            g["method"], f"{g['zero1_best_lr']:g}", f"{g['zero1_best_final_val_loss']:.4f}",
            None if g["final_val_loss_at_zero1_best_lr"] is None else f"{g['final_val_loss_at_zero1_best_lr']:.4f}",
            _pct(g["gap_at_zero1_best_lr"]), _pct_stats(g["paired_gap_at_zero1_best_lr"]),
            f"{g['best_lr']:g}", f"{g['best_final_val_loss']:.4f}", _pct(g["gap_best_vs_best"]),
            _pct(g["gap_vs_zero1_at_own_best_lr"])] for g in data["gaps"]]
        head = (["world", "bandwidth"] if len(settings) > 1 else []) + [
            "method", "zero1's best lr", "zero1 loss", "method loss there", "gap there", "paired gap there",
            "method's best lr", "method's best loss", "best vs best", "vs zero1 at method's best lr"]
        lines += [report.markdown_table(head, rows), ""]
    traced = [r for r in data["results"] if r.get("estimate_error")]
    if traced:
        lines += [
            "**Estimate error (acco)**: per committed update t, ‖θ̃ₜ − θₜ‖ / ‖θₜ − θₜ₋₁‖ (the estimate's distance from "
            "the committed parameters, relative to the committed update; global L2). Median over the updates of each "
            "phase, then median over seeds. Phases: the warm-up, then thirds of the cosine decay. *‖θ̃ₜ − θₜ‖* and "
            "*‖θₜ − θₜ₋₁‖*: medians over the whole run (the distances grow with the rate; their ratio hardly does). "
            "Update 1's ratio is 1 by construction here: its estimate round runs at the schedule's first rate, ~0.",
            "",
        ]
        rows = [([r["world"], r["bandwidth"]] if len(settings) > 1 else []) + [
            r["method"], f"{r['lr']:g}", *[_num(r["estimate_error"][p]) for p in (*PHASES, "all")],
            _sci(r["estimate_error"]["error_norm"]), _sci(r["estimate_error"]["step_norm"]),
            _pct(r["final_val_loss_vs_zero1"])] for r in traced]
        head = (["world", "bandwidth"] if len(settings) > 1 else []) + [
            "method", "peak lr", *PHASES, "whole run", "‖θ̃ₜ − θₜ‖", "‖θₜ − θₜ₋₁‖", "final loss vs zero1"]
        lines.append(report.markdown_table(head, rows))
    return "\n".join(lines)


def _num(value: Optional[float]) -> Optional[str]:
    return None if value is None else f"{value:.3f}"


def _sci(value: Optional[float]) -> Optional[str]:
    return None if value is None else f"{value:.3g}"


def plot(plt: Any, data: dict[str, Any]) -> None:
    """Top: final validation loss against peak lr (mean, min–max bars). Bottom: acco's estimate
    error per update (median over seeds, one line per lr), with the schedule's shape."""
    traced = [r for r in data["runs"] if r.get("estimate_error")]
    fig, axes = plt.subplots(2 if traced else 1, 1, figsize=(8, 8 if traced else 4), squeeze=False)
    top = axes[0][0]
    methods = list(dict.fromkeys(r["method"] for r in data["results"]))
    settings = list(dict.fromkeys((r["world"], r["bandwidth"]) for r in data["results"]))
    for i, m in enumerate(methods):
        for j, setting in enumerate(settings):
            rows = sorted((r for r in data["results"] if r["method"] == m and (r["world"], r["bandwidth"]) == setting),
                          key=lambda r: r["lr"])
            if not rows:
                continue
            shift = 1.0 + 0.03 * (i - (len(methods) - 1) / 2)  # side by side on the log axis
            xs = [r["lr"] * shift for r in rows]
            ys = [r["final_val_loss"] for r in rows]
            err = [[y - r["final_val_loss_spread"][0] for y, r in zip(ys, rows)], [r["final_val_loss_spread"][1] - y for y, r in zip(ys, rows)]]
            label = m if len(settings) == 1 else f"{m}, world {setting[0]} {setting[1]}"
            top.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=f"C{i}", linestyle=["-", "--", ":"][j % 3], label=label)
    top.set_xscale("log")
    top.set_xlabel("peak learning rate")
    top.set_ylabel("final validation loss (mean; bars: min–max over seeds)")
    top.grid(alpha=0.3, which="both")
    top.legend(fontsize=8)
    c = data["config"]
    top.set_title(f"model {c['model']}, {c['updates']} updates, seeds {c['seeds']}")
    if not traced:
        return
    bottom = axes[1][0]
    lrs = sorted({r["lr"] for r in traced})
    traced_methods = list(dict.fromkeys(r["method"] for r in traced))
    for k, lr in enumerate(lrs):
        for style, name in zip(("-", "--", ":"), traced_methods):
            per_update: dict[int, list[float]] = {}
            for run in (r for r in traced if r["lr"] == lr and r["method"] == name):
                for row in run["estimate_error"]:
                    per_update.setdefault(row["update"], []).append(row["ratio"])
            if not per_update:
                continue
            xs = sorted(per_update)
            ys = [statistics.median(per_update[x]) for x in xs]
            bottom.plot(xs, ys, color=f"C{k}", linewidth=0.6, alpha=0.25, linestyle=style)
            smooth = [statistics.median(ys[max(0, i - 5):i + 6]) for i in range(len(ys))]  # running median of 11 updates
            bottom.plot(xs, smooth, color=f"C{k}", linewidth=1.5, linestyle=style, label=f"{name}, peak lr {lr:g}")
    bottom.set_yscale("log")
    bottom.set_xlabel("committed update t")
    bottom.set_ylabel("‖θ̃ₜ − θₜ‖ / ‖θₜ − θₜ₋₁‖ (median over seeds)")
    bottom.set_title("acco's estimate error (thin: per update; thick: running median of 11)", fontsize=10)
    bottom.grid(alpha=0.3, which="both")
    first = traced[0]
    warmup_end = c["warmup_fraction"] * first["updates"] + 1  # the first update whose rounds start after the warm-up
    bottom.axvline(warmup_end, color="grey", linewidth=0.8, linestyle=":", label="end of warm-up")
    shape = bottom.twinx()
    rows = [row for row in first["estimate_error"] if row["lr"] is not None]
    shape.plot([row["update"] for row in rows], [row["lr"] / first["lr"] for row in rows], color="grey",
               linestyle="--", linewidth=0.8, label="commit round's lr / peak lr")
    shape.set_ylim(0, 1.05)
    shape.set_ylabel("lr / peak lr", color="grey")
    handles, labels = bottom.get_legend_handles_labels()
    more, more_labels = shape.get_legend_handles_labels()
    bottom.legend(handles + more, labels + more_labels, fontsize=8)


def settings_of(args: argparse.Namespace) -> list[launcher.Setting]:
    return launcher.parse_settings(args.world, args.bandwidth)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.report_only and not ranks.is_rank_process():
        make_report(args, argv, partials_from_runs(runs_path(args.json)))
        return 0
    for lr in launcher.parse_list(args.lrs, float):
        if not (lr > 0 and math.isfinite(lr)):
            raise SystemExit(f"--lrs: {lr!r} is not a positive learning rate")
    return launcher.main("benchmarks.lr_sweep", parser(), argv, settings_of, rank_main, make_report)


if __name__ == "__main__":
    raise SystemExit(main())
