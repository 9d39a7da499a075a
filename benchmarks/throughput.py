"""Report 1: throughput against bandwidth, every method side by side.

For each setting (world size, bandwidth) the ranks are launched once; inside, the methods are
interleaved and repeated. Reported per method: samples/s (micro-batches of ``--batch-size``
sequences processed per second, all ranks together; in mode acco two calls make one update),
seconds per call, ``overlap_efficiency = compute_only time / method time`` and
``speedup_vs_zero1``; per setting, one round's communication time measured alone.

    python -m benchmarks.throughput --world 2 --bandwidth 0.5gbit,1gbit,2gbit,5gbit --extra 4@1gbit
    torchrun --nproc-per-node 2 -m benchmarks.throughput --methods compute_only,zero1,acco   # real cluster
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

from . import launcher, report
from .gpt import MODELS, model_config
from .measure import Spec, measure, summarise
from .methods import METHODS, check_methods


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default="2", help="world sizes, comma-separated")
    p.add_argument("--bandwidth", default="1gbit", help="per-rank link rates, comma-separated (none = no limit)")
    p.add_argument("--extra", default="", help="more settings as WORLD@BANDWIDTH, comma-separated (e.g. 4@1gbit)")
    p.add_argument("--model", choices=sorted(MODELS), default="small")
    p.add_argument("--batch-size", type=int, default=12, help="sequences per rank per call")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2, help="rounds before the timed window")
    p.add_argument("--rounds", type=int, default=6, help="rounds in the timed window")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--data", default=None, help="a text file instead of the stdlib corpus")
    launcher.add_common_arguments(p, "benchmarks/results/throughput.json")
    return p


def spec_of(args: argparse.Namespace, label: str) -> Spec:
    return Spec(
        model=model_config(args.model), batch_size=args.batch_size, methods=check_methods(args.methods.split(",")),
        repeats=args.repeats, warmup_rounds=args.warmup, rounds=args.rounds, seed=args.seed, data=args.data, label=label,
    )


def rank_main(args: argparse.Namespace) -> Optional[dict[str, Any]]:
    setting = launcher.rank_setting()
    measured = measure(spec_of(args, f"throughput world {setting['world']} {setting['bandwidth']}"))
    if measured is None:
        return None
    return {**measured, "results": summarise(measured, spec_of(args, "").methods, {})}


def make_report(args: argparse.Namespace, argv: list[str], partials: list[dict[str, Any]]) -> None:
    results, runs = [], []
    for part in partials:
        setting = report.where(part)
        compute = next((r for r in part["results"] if r["method"] == "compute_only"), None)
        for row in part["results"]:
            results.append({**setting, **row, "comm_to_compute": part["comm_round_s"] / compute["step_time_s"] if compute else None})
        runs += [{**setting, **run} for run in part["runs"]]
    config = report.config(
        "throughput", args, argv, partials[0]["parameters"] if partials else None,
        samples="sequences of block_size bytes; samples_per_s counts micro-batches processed by all ranks",
    )
    data = {"config": config, "results": results, "runs": runs}
    report.write(args.json, data, markdown(data), plot, make_plot=not args.no_plot)


def markdown(data: dict[str, Any]) -> str:
    c = data["config"]
    lines = [
        f"Throughput: model {c['model']} ({c['parameters'] / 1e6:.1f}M parameters), {c['batch_size']} × "
        f"{c['model_config']['block_size']} bytes per rank per call, fp32, {c['repeats']} repeats of {c['rounds']} rounds "
        f"after {c['warmup']} warm-up rounds; medians, spread = min–max over repeats. "
        "overlap = compute_only time / method time; comm/compute = one round's reduce-scatter + all-gather alone "
        "over one compute_only call.", "",
    ]
    rows = []
    for r in data["results"]:
        lo, hi = r["samples_per_s_spread"]
        rows.append([r["world"], r["bandwidth"], f"{r['comm_to_compute']:.2f}" if r["comm_to_compute"] is not None else None,
                     r["method"], f"{r['samples_per_s']:.1f}", f"{lo:.1f}–{hi:.1f}", f"{r['step_time_s']:.3f}",
                     _ratio(r["overlap_efficiency"]), _ratio(r["speedup_vs_zero1"]), f"{report.mib(r['peak_rss_bytes']):.0f}"])
    lines.append(report.markdown_table(
        ["world", "bandwidth", "comm/compute", "method", "samples/s", "spread", "s/call", "overlap", "vs zero1", "peak RSS MiB"], rows))
    return "\n".join(lines)


def _ratio(value: Optional[float]) -> Optional[str]:
    return None if value is None else f"{value:.2f}"


def plot(plt: Any, data: dict[str, Any]) -> None:
    """Samples/s against bandwidth, one panel per world size, one line per method."""
    results = data["results"]
    worlds = sorted({r["world"] for r in results})
    fig, axes = plt.subplots(1, len(worlds), figsize=(5.5 * len(worlds), 4), squeeze=False)
    for ax, world in zip(axes[0], worlds):
        rows = [r for r in results if r["world"] == world]
        for method in dict.fromkeys(r["method"] for r in rows):
            points = sorted(((r["bandwidth_bps"] or 0) / 1e9, r) for r in rows if r["method"] == method)
            xs = [x for x, _ in points]
            ys = [r["samples_per_s"] for _, r in points]
            err = [[y - r["samples_per_s_spread"][0] for (_, r), y in zip(points, ys)],
                   [r["samples_per_s_spread"][1] - y for (_, r), y in zip(points, ys)]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=method)
        if all(r["bandwidth_bps"] for r in rows):
            ax.set_xscale("log")
        ax.set_xlabel("bandwidth per rank (Gbit/s; 0 = unlimited)")
        ax.set_ylabel("samples/s (all ranks)")
        ax.set_title(f"world {world}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Throughput, model {data['config']['model']}")


def settings_of(args: argparse.Namespace) -> list[launcher.Setting]:
    return launcher.parse_settings(args.world, args.bandwidth, args.extra)


def main(argv: Optional[list[str]] = None) -> int:
    return launcher.main("benchmarks.throughput", parser(), argv, settings_of, rank_main, make_report)


if __name__ == "__main__":
    raise SystemExit(main())
