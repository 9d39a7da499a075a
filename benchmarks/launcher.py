"""The flow every report script shares: one script, two roles.

* As a **rank** (``RANK`` in the environment: under torchrun on a real cluster, or started by
  ``benchmarks.cluster``), it joins the process group, measures one configuration and, on rank 0,
  writes either a partial result for the launcher (``ACCO_BENCH_PARTIAL``) or, under torchrun,
  the whole report.
* As a **launcher** (no ``RANK``), it starts the ranks once per configuration (world size,
  bandwidth) on the simulated cluster, collects the partial results and writes the report.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from . import cluster, ranks

PARTIAL_ENV = "ACCO_BENCH_PARTIAL"
BANDWIDTH_ENV = "ACCO_BENCH_BANDWIDTH"
ONLY_ENV = "ACCO_BENCH_ONLY"  # a launch that measures one method alone (fresh processes, for memory)


@dataclass(frozen=True)
class Setting:
    """One launch: how many ranks, and the link each has."""

    world: int
    bandwidth_bps: Optional[int]
    only: Optional[str] = None  # restrict the launch to this method

    @property
    def bandwidth(self) -> str:
        return cluster.format_bandwidth(self.bandwidth_bps)


def add_common_arguments(parser: argparse.ArgumentParser, default_json: str) -> None:
    parser.add_argument("--network", choices=["auto", "netns", "loopback"], default="auto",
                        help="netns: simulated cluster (root); loopback: no limit; auto: netns if possible")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per launch of the ranks")
    parser.add_argument("--json", type=Path, default=Path(default_json), help="report path (.md and .png beside it)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")


def parse_list(text: str, convert: Callable[[str], Any]) -> list[Any]:
    return [convert(item) for item in text.split(",") if item.strip()]


def parse_settings(worlds: str, bandwidths: str, extra: Optional[str] = None) -> list[Setting]:
    """``--world 2,4 --bandwidth 1gbit,5gbit`` is the cross product; ``--extra 4@1gbit,4@5gbit``
    adds single settings (e.g. world 4 at a few bandwidths only)."""
    settings = [Setting(w, cluster.parse_bandwidth(b)) for w in parse_list(worlds, int) for b in parse_list(bandwidths, str)]
    for item in parse_list(extra or "", str):
        world, _, bandwidth = item.partition("@")
        settings.append(Setting(int(world), cluster.parse_bandwidth(bandwidth or "none")))
    for s in settings:
        if s.world < 1:
            raise ValueError(f"world size must be >= 1, got {s.world}")
    return settings


def only_method() -> Optional[str]:
    """The one method this launch measures, if the launcher asked for that."""
    return os.environ.get(ONLY_ENV) or None


def rank_setting() -> dict[str, Any]:
    """What network this rank runs on (set by our harness; 'native' under torchrun)."""
    text = os.environ.get(BANDWIDTH_ENV, "")
    bps = int(text) if text else None
    network = ranks.network_of_this_run()
    return {
        "world": int(os.environ["WORLD_SIZE"]),
        "network": network,
        "bandwidth": cluster.format_bandwidth(bps) if network == "netns" else ("unlimited" if network == "loopback" else "native"),
        "bandwidth_bps": bps if network == "netns" else None,
    }


def main(
    module: str,
    parser: argparse.ArgumentParser,
    argv: Optional[list[str]],
    settings_of: Callable[[argparse.Namespace], list[Setting]],
    rank_main: Callable[[argparse.Namespace], Optional[dict[str, Any]]],
    make_report: Callable[[argparse.Namespace, list[str], list[dict[str, Any]]], None],
) -> int:
    """``rank_main`` returns rank 0's partial result (a dict) for one setting; ``make_report``
    turns the partials of all settings into the written report."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if ranks.is_rank_process():
        rank, _ = ranks.init()
        try:
            partial = rank_main(args)
        finally:
            ranks.shutdown()
        if rank == 0 and partial is not None:
            partial = {**rank_setting(), **partial}
            target = os.environ.get(PARTIAL_ENV)
            if target:
                Path(target).write_text(json.dumps(partial))
            else:  # torchrun on a real cluster: this launch is the whole report
                make_report(args, argv, [partial])
        _exit_now(0)
    try:
        partials = _launch_all(module, args, argv, settings_of)
    except KeyboardInterrupt as interrupt:
        print(f"{module}: interrupted ({str(interrupt) or 'Ctrl-C'}); ranks stopped, network removed", file=sys.stderr)
        return 130
    except cluster.RanksFailed as failure:
        print(f"{module}: {failure}", file=sys.stderr)
        return 1
    make_report(args, argv, partials)
    return 0


def _exit_now(code: int) -> None:
    """End a rank without the interpreter's teardown. Everything is written and the process group
    is destroyed by now; torch 2.13's C++ static destructors sometimes abort at exit ("terminate
    called without an active exception", seen after DDP/ZeroRedundancyOptimizer runs with a fixed
    MALLOC_MMAP_THRESHOLD_), which would fail a finished launch."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def _launch_all(module: str, args: argparse.Namespace, argv: list[str],
                settings_of: Callable[[argparse.Namespace], list[Setting]]) -> list[dict[str, Any]]:
    partials = []
    for setting in settings_of(args):
        only = f", method {setting.only}" if setting.only else ""
        print(f"== {module}: world {setting.world}, bandwidth {setting.bandwidth}{only} ==", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="accob-partial-") as tmp:
            target = Path(tmp) / "partial.json"
            env = {PARTIAL_ENV: str(target), BANDWIDTH_ENV: "" if setting.bandwidth_bps is None else str(setting.bandwidth_bps),
                   ONLY_ENV: setting.only or ""}
            cluster.run_ranks([sys.executable, "-m", module, *argv], setting.world, setting.bandwidth_bps,
                              timeout_s=args.timeout, kind=args.network, env=env)
            partials.append(json.loads(target.read_text()))
    return partials
