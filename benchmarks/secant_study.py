"""Issue 22 part 2: does ``correction="secant"`` close acco's gap to the synchronous reference, and what does
it cost where acco has no gap?

Nothing is trained here: the script reads the runs files that ``benchmarks.lr_sweep`` (real optimizer,
``<stem>.runs.jsonl``: ``method``) and the simulators ``benchmarks.estimate_study`` / ``benchmarks.gap_by_batch``
(``rule``, ``batch_size``) append to, one finished run per line, or the ``runs`` list of an ``lr_sweep`` JSON
report. Each ``--family`` names a setup, its three
methods (the synchronous reference, plain acco, acco with the correction) and its runs files::

    --family "AdamW, 3.3M, 16/rank|zero1,acco,acco_secant|benchmarks/results/lr_sweep_small.runs.jsonl,benchmarks/results/secant_small.runs.jsonl"

For every peak rate at which all three ran on a common seed: the per-seed paired gaps to the reference
(loss / reference's loss − 1, same seed: same initial weights and batches), their means, and the share of
acco's gap the correction recovers, 1 − gap(corrected) / gap(acco). A family may add ``|batch=64`` to keep
simulator runs of one batch size. When a (method, lr, seed) appears twice the last line read wins.

    python -m benchmarks.secant_study --family ... --family ... --json benchmarks/results/secant_study.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Optional

Key = tuple[str, float, int]  # (method, lr, seed)


def parse_family(text: str) -> dict[str, Any]:
    parts = text.split("|")
    if len(parts) not in (3, 4):
        raise ValueError(f"a family is 'name|reference,acco,corrected|file,file[|batch=N]', got {text!r}")
    methods = parts[1].split(",")
    if len(methods) != 3:
        raise ValueError(f"a family names three methods (reference, acco, corrected), got {parts[1]!r}")
    batch = None
    if len(parts) == 4:
        name, _, value = parts[3].partition("=")
        if name != "batch":
            raise ValueError(f"unknown family filter {parts[3]!r} (batch=N)")
        batch = int(value)
    return {"name": parts[0], "methods": methods, "files": parts[2].split(","), "batch": batch}


def _runs(path: str) -> list[dict[str, Any]]:
    """A runs file (one run per line), or a report whose ``runs`` list holds them (``lr_sweep``'s JSON)."""
    text = Path(path).read_text()
    if path.endswith(".json"):
        return list(json.loads(text)["runs"])
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load(files: list[str], batch: Optional[int]) -> dict[Key, float]:
    losses: dict[Key, float] = {}
    for path in files:
        for run in _runs(path):
            if batch is not None and run.get("batch_size") not in (None, batch):
                continue
            method = run.get("method") or run.get("rule")
            losses[(method, float(run["lr"]), int(run["seed"]))] = float(run["final_val_loss"])
    return losses


def family_rows(family: dict[str, Any]) -> list[dict[str, Any]]:
    reference, plain, corrected = family["methods"]
    losses = load(family["files"], family["batch"])
    rows = []
    for lr in sorted({lr for (_, lr, _) in losses}):
        seeds = sorted(s for (m, r, s) in losses if m == corrected and r == lr and (reference, lr, s) in losses and (plain, lr, s) in losses)
        if not seeds:
            continue
        gaps = {m: [losses[(m, lr, s)] / losses[(reference, lr, s)] - 1 for s in seeds] for m in (plain, corrected)}
        mean_plain, mean_corrected = statistics.fmean(gaps[plain]), statistics.fmean(gaps[corrected])
        rows.append({
            "lr": lr, "seeds": seeds,
            "reference_loss": statistics.fmean(losses[(reference, lr, s)] for s in seeds),
            "acco_gaps": gaps[plain], "corrected_gaps": gaps[corrected],
            "acco_gap": mean_plain, "corrected_gap": mean_corrected,
            "recovered": 1 - mean_corrected / mean_plain if mean_plain > 0 else None,
            "corrected_better_on": sum(c < a for a, c in zip(gaps[plain], gaps[corrected])),
        })
    return rows


def _pct(x: float) -> str:
    return f"{100 * x:+.2f}%"


def markdown(families: list[dict[str, Any]], argv: list[str]) -> str:
    lines = ["# `correction=\"secant\"` against plain acco (issue 22 part 2)", "",
             "Final validation loss, paired by seed with the synchronous reference of the same setup (same initial weights, "
             "batches and validation windows): gap = loss / reference − 1. *Recovered*: 1 − mean gap with the correction / "
             "mean gap of plain acco (negative: the correction made it worse).", "",
             "```", "python -m benchmarks.secant_study " + " ".join(f"'{a}'" if " " in a or "|" in a else a for a in argv), "```", ""]
    for family in families:
        reference, plain, corrected = family["methods"]
        lines += [f"## {family['name']}", "", f"Reference `{reference}`, acco `{plain}`, corrected `{corrected}`.", "",
                  "| peak lr | seeds | reference loss | acco gap per seed | corrected gap per seed | acco gap | corrected gap | recovered | corrected better on |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in family["rows"]:
            recovered = "–" if row["recovered"] is None else f"{100 * row['recovered']:.0f}%"
            lines.append(
                f"| {row['lr']:g} | {','.join(map(str, row['seeds']))} | {row['reference_loss']:.4f} | "
                f"{' / '.join(_pct(g) for g in row['acco_gaps'])} | {' / '.join(_pct(g) for g in row['corrected_gaps'])} | "
                f"{_pct(row['acco_gap'])} | **{_pct(row['corrected_gap'])}** | {recovered} | {row['corrected_better_on']}/{len(row['seeds'])} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", action="append", required=True, help="name|reference,acco,corrected|file,file[|batch=N]")
    p.add_argument("--json", default="benchmarks/results/secant_study.json")
    args = p.parse_args(argv)
    families = [parse_family(text) for text in args.family]
    for family in families:
        family["rows"] = family_rows(family)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"argv": argv, "families": families}, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(families, argv))
    print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
