"""Report 4: heterogeneous workers, one rank slowed by a declared factor.

The slowdown is simulated: before the first run, the slow rank times its own forward+backward on
its own (median of 4 after one warm-up, no communication) and afterwards sleeps (factor - 1) x
that time after the backward of every micro-batch, in every method alike. Sleeping leaves its
core idle rather than busy; it models a slower device, not a busier host.

samples/s is the sum of each rank's own micro-batches per second. Blocking methods make every
rank wait for the slow one; ``acco_nonblocking`` lets the fast ranks keep accumulating
micro-batches while a round is in flight (they weigh more in the average, see docs/design.md §1).
compute_only (no communication, every rank at its own speed) is the limit.

    python -m benchmarks.heterogeneous --world 2 --bandwidth 1gbit --factor 2
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

from . import launcher, report
from .gpt import MODELS, model_config
from .measure import Spec, measure, summarise
from .methods import check_methods

DEFAULT_METHODS = "compute_only,zero1,acco,acco_nonblocking"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default="2", help="world sizes, comma-separated")
    p.add_argument("--bandwidth", default="1gbit", help="per-rank link rates, comma-separated (none = no limit)")
    p.add_argument("--extra", default="", help="more settings as WORLD@BANDWIDTH")
    p.add_argument("--factor", type=float, default=2.0, help="the slow rank takes this many times as long per micro-batch")
    p.add_argument("--slow-rank", type=int, default=None, help="which rank is slow (default: the last)")
    p.add_argument("--model", choices=sorted(MODELS), default="small")
    p.add_argument("--batch-size", type=int, default=12, help="sequences per rank per call")
    p.add_argument("--methods", default=DEFAULT_METHODS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2, help="rounds before the timed window")
    p.add_argument("--rounds", type=int, default=6, help="rounds in the timed window")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--data", default=None)
    launcher.add_common_arguments(p, "benchmarks/results/heterogeneous.json")
    return p


def rank_main(args: argparse.Namespace) -> Optional[dict[str, Any]]:
    setting = launcher.rank_setting()
    slow_rank = setting["world"] - 1 if args.slow_rank is None else args.slow_rank
    if not 0 <= slow_rank < setting["world"]:
        raise ValueError(f"--slow-rank {slow_rank} is not a rank of a world of {setting['world']}")
    spec = Spec(
        model=model_config(args.model), batch_size=args.batch_size, methods=check_methods(args.methods.split(",")),
        repeats=args.repeats, warmup_rounds=args.warmup, rounds=args.rounds, seed=args.seed, data=args.data,
        slow_rank=slow_rank, slow_factor=args.factor,
        label=f"heterogeneous world {setting['world']} {setting['bandwidth']} rank {slow_rank} x{args.factor:g}",
    )
    measured = measure(spec)
    if measured is None:
        return None
    return {**measured, "slow_rank": slow_rank, "results": summarise(measured, spec.methods, {})}


def make_report(args: argparse.Namespace, argv: list[str], partials: list[dict[str, Any]]) -> None:
    results, runs = [], []
    for part in partials:
        setting = report.where(part, slow_rank=part["slow_rank"], slow_factor=args.factor, slow_sleep_s=max(part["slow_sleep_s"]))
        results += [{**setting, **row} for row in part["results"]]
        runs += [{**setting, **run} for run in part["runs"]]
    config = report.config(
        "heterogeneous", args, argv, partials[0]["parameters"] if partials else None,
        slowdown="the slow rank sleeps (factor - 1) x its own median forward+backward time after every micro-batch",
    )
    data = {"config": config, "results": results, "runs": runs}
    report.write(args.json, data, markdown(data), plot, make_plot=not args.no_plot)


def markdown(data: dict[str, Any]) -> str:
    c = data["config"]
    lines = [
        f"Heterogeneous workers: model {c['model']} ({c['parameters'] / 1e6:.1f}M parameters), {c['batch_size']} × "
        f"{c['model_config']['block_size']} bytes per rank per call, fp32. One rank sleeps (factor − 1) × its own "
        f"measured forward+backward time after every micro-batch. {c['repeats']} repeats of {c['rounds']} rounds; "
        "medians, spread = min–max. samples/s = sum over ranks of each rank's micro-batches per second.", "",
    ]
    rows = []
    for r in data["results"]:
        lo, hi = r["samples_per_s_spread"]
        rows.append([r["world"], r["bandwidth"], f"rank {r['slow_rank']} ×{r['slow_factor']:g} (+{r['slow_sleep_s']:.3f} s)",
                     r["method"], f"{r['samples_per_s']:.1f}", f"{lo:.1f}–{hi:.1f}", "/".join(map(str, r["calls_per_rank"])),
                     None if r["speedup_vs_zero1"] is None else f"{r['speedup_vs_zero1']:.2f}",
                     None if r["overlap_efficiency"] is None else f"{r['overlap_efficiency']:.2f}"])
    lines.append(report.markdown_table(
        ["world", "bandwidth", "slow rank", "method", "samples/s", "spread", "calls per rank", "vs zero1", "vs compute_only"], rows))
    return "\n".join(lines)


def plot(plt: Any, data: dict[str, Any]) -> None:
    """Bars of samples/s per method, one group per setting, with min–max whiskers."""
    results = data["results"]
    settings = list(dict.fromkeys((r["world"], r["bandwidth"]) for r in results))
    methods = list(dict.fromkeys(r["method"] for r in results))
    fig, ax = plt.subplots(figsize=(max(5, 1.8 * len(settings) * len(methods) / 2), 4))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        for j, setting in enumerate(settings):
            row = next((r for r in results if r["method"] == method and (r["world"], r["bandwidth"]) == setting), None)
            if row is None:
                continue
            y, (lo, hi) = row["samples_per_s"], row["samples_per_s_spread"]
            ax.bar(j + i * width, y, width, yerr=[[y - lo], [hi - y]], capsize=3, color=f"C{i}", label=method if j == 0 else None)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(settings))], [f"world {w}, {b}" for w, b in settings])
    ax.set_ylabel("samples/s (all ranks)")
    ax.set_title(f"One rank ×{data['config']['factor']:g} slower, model {data['config']['model']}")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def settings_of(args: argparse.Namespace) -> list[launcher.Setting]:
    return launcher.parse_settings(args.world, args.bandwidth, args.extra)


def main(argv: Optional[list[str]] = None) -> int:
    return launcher.main("benchmarks.heterogeneous", parser(), argv, settings_of, rank_main, make_report)


if __name__ == "__main__":
    raise SystemExit(main())
