"""Issue 16's study: with Muon on the hidden matrices, how far are ``dpu`` and ``acco`` from
synchronous training, compared with AdamW?

Why a separate report: the question compares two *families* of runs, each against its own
synchronous reference, and the runs come from several sweeps (``benchmarks.lr_sweep`` launches):

* AdamW: reference ``zero1`` (ZeRO-1 + AdamW), delayed ``dpu`` and ``acco``;
* Muon: reference ``sync_muon`` (acco's ZeRO-1, mode sync, Muon for the blocks' 2-D matrices +
  AdamW for the rest), delayed ``dpu_muon`` and ``acco_muon``.

Same rules as the convergence report: equal samples and updates, the same fixed validation windows,
seeds paired (a seed fixes the initial weights and the training batches). Every method is read at
its own learning rates from a small sweep; the reference's best rate (lowest mean final validation
loss over seeds) is where the headline gaps are measured, and "best against best" is shown beside.

A gap is *within noise* when the per-seed paired gaps (the method's loss / the reference's, same
seed, minus 1) range over 0, or when |gap of the means| is below the reference's relative seed
standard deviation (std / mean) at that rate; the report says which test passed.

    python -m benchmarks.muon_study \\
        --runs benchmarks/results/lr_sweep.runs.jsonl,benchmarks/results/muon_study_adamw.runs.jsonl,benchmarks/results/muon_study.runs.jsonl \\
        --json benchmarks/results/muon_study.json

Nothing is trained here: the script reads the ``<stem>.runs.jsonl`` files that ``lr_sweep`` ranks
append to (one finished run per line). When the same (method, lr, seed) appears more than once,
the last one read wins: the last file given, and within a file the last line (the report lists
every replacement). Writes ``<json>`` (config + results), ``<json stem>.md`` and ``<json stem>.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Optional

from . import report

# role -> method, per family; the reference is the synchronous run of the same inner optimizer(s)
FAMILIES: dict[str, dict[str, str]] = {
    "AdamW": {"reference": "zero1", "dpu": "dpu", "acco": "acco"},
    "Muon": {"reference": "sync_muon", "dpu": "dpu_muon", "acco": "acco_muon"},
}
DELAYED = ("dpu", "acco")
ROLE_COLOURS = {"reference": "C0", "dpu": "C1", "acco": "C2"}
FAMILY_STYLES = {"AdamW": "-", "Muon": "--"}
SETTING_KEYS = ("world", "network", "bandwidth")
Key = tuple[str, float, int]  # (method, lr, seed)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", required=True,
                   help="comma-separated runs files (lr_sweep's <stem>.runs.jsonl); on a repeated (method, lr, seed) the last wins")
    p.add_argument("--json", type=Path, default=report.RESULTS / "muon_study.json")
    p.add_argument("--no-plot", action="store_true")
    return p


def family_of(method: str) -> Optional[tuple[str, str]]:
    """(family, role) of a method, or None for a method outside the study."""
    for family, roles in FAMILIES.items():
        for role, name in roles.items():
            if name == method:
                return family, role
    return None


# ----------------------------------------------------------------------------- reading the runs
def load_runs(paths: list[Path]) -> tuple[dict[Key, dict[str, Any]], list[dict[str, Any]], list[str]]:
    """The runs of the study's methods by (method, lr, seed), the last one read winning; the
    replacements made; and the other methods met (ignored)."""
    runs: dict[Key, dict[str, Any]] = {}
    replaced: list[dict[str, Any]] = []
    ignored: dict[str, None] = {}
    for path in paths:
        if not path.exists():
            raise SystemExit(f"--runs: no file {path}")
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            run = json.loads(line)
            if family_of(run["method"]) is None:
                ignored[run["method"]] = None
                continue
            key = (run["method"], float(run["lr"]), int(run["seed"]))
            run = {k: v for k, v in run.items() if k != "estimate_error"}  # acco's trace: see the lr_sweep report
            run["source"] = f"{path}:{number}"
            if key in runs:
                replaced.append({"method": key[0], "lr": key[1], "seed": key[2], "old": runs[key]["source"],
                                 "new": run["source"], "old_final_val_loss": runs[key]["final_val_loss"],
                                 "new_final_val_loss": run["final_val_loss"]})
            runs[key] = run
    if not runs:
        raise SystemExit(f"no runs of {', '.join(m for f in FAMILIES.values() for m in f.values())} in {', '.join(map(str, paths))}")
    return runs, replaced, list(ignored)


# ----------------------------------------------------------------------------- summary
def stats(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "n": len(values)}


class Study:
    """The runs by (method, lr), with the per-seed pairing that every gap uses."""

    def __init__(self, runs: dict[Key, dict[str, Any]]) -> None:
        self.runs = runs
        self.cells: dict[tuple[str, float], dict[int, dict[str, Any]]] = {}
        for (method, lr, seed), run in sorted(runs.items()):
            self.cells.setdefault((method, lr), {})[seed] = run

    def lrs(self, method: str) -> list[float]:
        return sorted(lr for m, lr in self.cells if m == method)

    def losses(self, method: str, lr: float) -> dict[int, float]:
        return {seed: run["final_val_loss"] for seed, run in self.cells.get((method, lr), {}).items()}

    def mean(self, method: str, lr: float) -> float:
        return statistics.fmean(self.losses(method, lr).values())

    def best_lr(self, method: str) -> Optional[float]:
        lrs = self.lrs(method)
        return min(lrs, key=lambda lr: self.mean(method, lr)) if lrs else None

    def relative_std(self, method: str, lr: float) -> Optional[float]:
        values = list(self.losses(method, lr).values())
        return statistics.stdev(values) / statistics.fmean(values) if len(values) > 1 else None

    def gap(self, method: str, lr: float, reference: str, reference_lr: float) -> dict[str, Any]:
        """``method`` at ``lr`` against ``reference`` at ``reference_lr``: the ratio of the means − 1,
        the per-seed paired ratios − 1 (seeds that both ran), and the noise verdict."""
        mine, base = self.losses(method, lr), self.losses(reference, reference_lr)
        gap = self.mean(method, lr) / self.mean(reference, reference_lr) - 1.0
        paired_values = [mine[s] / base[s] - 1.0 for s in sorted(mine) if s in base]
        paired = stats(paired_values) if paired_values else None
        rel_std = self.relative_std(reference, reference_lr)
        reasons = []
        if paired is not None and paired["n"] > 1 and paired["min"] <= 0.0 <= paired["max"]:
            reasons.append("paired range includes 0")
        if rel_std is not None and abs(gap) < rel_std:
            reasons.append("gap below the reference's relative std")
        return {
            "method": method, "lr": lr, "final_val_loss": self.mean(method, lr), "seeds": sorted(mine),
            "reference": reference, "reference_lr": reference_lr, "reference_final_val_loss": self.mean(reference, reference_lr),
            "gap": gap, "paired_gap": paired, "paired_seeds": sorted(s for s in mine if s in base),
            "reference_relative_std": rel_std, "within_noise": bool(reasons), "within_noise_because": reasons,
        }

    def train_s(self, method: str, lr: float) -> Optional[float]:
        times = [run["train_wall_s"] for run in self.cells.get((method, lr), {}).values() if "train_wall_s" in run]
        return statistics.fmean(times) if times else None

    def mean_curve(self, method: str, lr: float) -> list[dict[str, float]]:
        """Validation loss against samples, mean over seeds, at the evaluations that every seed has."""
        runs = list(self.cells.get((method, lr), {}).values())
        points: dict[int, list[float]] = {}
        for run in runs:
            for point in run.get("curve", []):
                points.setdefault(point["samples"], []).append(point["val_loss"])
        return [{"samples": s, "val_loss": statistics.fmean(v)} for s, v in sorted(points.items()) if len(v) == len(runs)]


def cell_rows(study: Study) -> list[dict[str, Any]]:
    """One row per (method, lr): the final validation loss over seeds, and against the family's
    reference at the same rate."""
    rows = []
    for family, roles in FAMILIES.items():
        for role, method in roles.items():
            for lr in study.lrs(method):
                s = stats(list(study.losses(method, lr).values()))
                runs = list(study.cells[(method, lr)].values())
                reference = roles["reference"]
                vs = study.gap(method, lr, reference, lr) if (reference, lr) in study.cells else None
                rows.append({
                    "family": family, "role": role, "method": method, "lr": lr, "seeds": sorted(study.cells[(method, lr)]),
                    "final_val_loss": s["mean"], "final_val_loss_std": s["std"], "final_val_loss_spread": [s["min"], s["max"]],
                    "vs_reference": None if vs is None else vs["gap"], "paired_vs_reference": None if vs is None else vs["paired_gap"],
                    "train_wall_s": study.train_s(method, lr),
                    "updates": sorted({r["updates"] for r in runs}), "samples": sorted({r["samples"] for r in runs}),
                })
    return rows


def family_summary(study: Study, family: str) -> dict[str, Any]:
    """The reference's best rate, and each delayed method's gap there and at its own best rate."""
    roles = FAMILIES[family]
    reference = roles["reference"]
    ref_best = study.best_lr(reference)
    out: dict[str, Any] = {"family": family, "reference": reference, "reference_best_lr": ref_best,
                           "missing": [m for m in roles.values() if not study.lrs(m)]}
    if ref_best is None:
        return out
    out["reference_best_final_val_loss"] = study.mean(reference, ref_best)
    out["reference_relative_std"] = study.relative_std(reference, ref_best)
    for role in DELAYED:
        method = roles[role]
        own_best = study.best_lr(method)
        if own_best is None:
            out[role] = None
            continue
        out[role] = {
            "method": method, "best_lr": own_best,
            "at_reference_best_lr": study.gap(method, ref_best, reference, ref_best) if (method, ref_best) in study.cells else None,
            "best_vs_best": study.gap(method, own_best, reference, ref_best),
        }
    return out


def cross_family(study: Study) -> Optional[dict[str, Any]]:
    """Synchronous Muon + AdamW against synchronous AdamW (zero1), each at its own best rate."""
    muon, adamw = FAMILIES["Muon"]["reference"], FAMILIES["AdamW"]["reference"]
    muon_best, adamw_best = study.best_lr(muon), study.best_lr(adamw)
    if muon_best is None or adamw_best is None:
        return None
    return study.gap(muon, muon_best, adamw, adamw_best)


def speed_rows(study: Study, families: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean training seconds per method at its family reference's best rate (training only, no evaluations)."""
    rows = []
    for family, summary in families.items():
        lr = summary["reference_best_lr"]
        if lr is None:
            continue
        roles = FAMILIES[family]
        ref_s = study.train_s(roles["reference"], lr)
        for role, method in roles.items():
            seconds = study.train_s(method, lr)
            if seconds is None:
                continue
            updates = study.cells[(method, lr)][min(study.cells[(method, lr)])]["updates"]
            rows.append({"family": family, "role": role, "method": method, "lr": lr, "train_wall_s": seconds,
                         "ms_per_update": 1e3 * seconds / updates,
                         "vs_reference": seconds / ref_s if ref_s else None})
    return rows


def _pct(value: Optional[float]) -> str:
    return "–" if value is None else f"{100 * value:+.2f}%"


def _pct_stats(s: Optional[dict[str, Any]]) -> str:
    if s is None:
        return "–"
    text = f"{100 * s['mean']:+.2f}%"
    if s["n"] > 1:
        text += f" ({100 * s['min']:+.2f} to {100 * s['max']:+.2f})"
    return text


def _verdict(gap: Optional[dict[str, Any]]) -> str:
    if gap is None:
        return "–"
    return f"within noise ({'; '.join(gap['within_noise_because'])})" if gap["within_noise"] else "outside noise"


def headline(families: dict[str, dict[str, Any]], speed: list[dict[str, Any]]) -> str:
    """The answer to the issue's question, in one or two sentences, from the numbers."""

    def at_ref(family: str, role: str) -> Optional[dict[str, Any]]:
        entry = families[family].get(role)
        return None if entry is None else entry["at_reference_best_lr"]

    def gaps(family: str) -> Optional[tuple[str, str]]:
        """dpu's and acco's gap at the reference's best lr, with the noise verdict."""
        if families[family]["reference_best_lr"] is None:
            return None
        out = []
        for role in DELAYED:
            gap = at_ref(family, role)
            out.append("missing" if gap is None else f"{_pct(gap['gap'])} ({'within' if gap['within_noise'] else 'outside'} noise)")
        return out[0], out[1]

    muon, adamw = gaps("Muon"), gaps("AdamW")
    if muon is None:
        text = f"No answer yet: the Muon family has no synchronous reference run (missing: {', '.join(families['Muon']['missing'])})."
        if adamw is not None:
            text += (f" With AdamW, dpu is {adamw[0]} and acco {adamw[1]} from synchronous "
                     f"(zero1's best lr {families['AdamW']['reference_best_lr']:g}).")
        return text
    text = (f"With Muon on the matrices, dpu is {muon[0]} and acco {muon[1]} from synchronous "
            f"(at sync_muon's best lr {families['Muon']['reference_best_lr']:g})")
    if adamw is not None:
        text += f", against {adamw[0]} and {adamw[1]} with AdamW (at zero1's best lr {families['AdamW']['reference_best_lr']:g})."
    else:
        text += "; no AdamW reference (zero1) to compare with."
    dpu = at_ref("Muon", "dpu")
    if dpu is not None and dpu["within_noise"]:
        seconds = {r["role"]: r["train_wall_s"] for r in speed if r["family"] == "Muon"}
        if "dpu" in seconds:
            others = ", ".join(f"{r} {seconds[r]:.1f} s" for r in ("reference", "acco") if r in seconds)
            text += (f" dpu with Muon is within noise of synchronous and needs no estimate round: "
                     f"{seconds['dpu']:.1f} s of training ({others}; loopback, so CPU cost, not network hiding).")
    return text


# ----------------------------------------------------------------------------- report
def build(paths: list[Path], json_path: Path, argv: list[str]) -> dict[str, Any]:
    runs, replaced, ignored = load_runs(paths)
    study = Study(runs)
    families = {family: family_summary(study, family) for family in FAMILIES}
    speed = speed_rows(study, families)
    settings = sorted({tuple(str(r.get(k)) for k in SETTING_KEYS) for r in runs.values()})
    budgets = sorted({(r["updates"], r["samples"], r.get("tokens_per_update")) for r in runs.values()})
    for what, seen in (("settings (world, network, bandwidth)", settings), ("budgets (updates, samples, tokens per update)", budgets)):
        if len(seen) > 1:
            print(f"[muon study] warning: the runs mix {what}: {seen}", file=sys.stderr)
    config = {
        "report": "muon_study", "argv": ["python", "-m", "benchmarks.muon_study", *argv],
        "runs_files": [str(p) for p in paths], "json": str(json_path),
        "families": FAMILIES, "precedence": "on a repeated (method, lr, seed) the last run read wins (last file given, last line)",
        "replaced": replaced, "ignored_methods": ignored,
        "settings": [dict(zip(SETTING_KEYS, s)) for s in settings],
        "budgets": [{"updates": u, "samples": s, "tokens_per_update": t} for u, s, t in budgets],
        "parameters": sorted({r["parameters"] for r in runs.values() if "parameters" in r}),
        "lrs": sorted({lr for _, lr, _ in runs}), "seeds": sorted({seed for _, _, seed in runs}),
        "noise_rule": "within noise if the per-seed paired gaps range over 0 (2+ seeds) or the absolute gap of the means < the reference's std/mean at its lr",
        "environment": report.environment(),
    }
    curves = {family: {method: study.mean_curve(method, s["reference_best_lr"])
                       for method in FAMILIES[family].values() if (method, s["reference_best_lr"]) in study.cells}
              for family, s in families.items() if s["reference_best_lr"] is not None}
    return {
        "config": config, "headline": headline(families, speed), "results": cell_rows(study), "families": families,
        "muon_vs_adamw": cross_family(study), "speed": speed, "curves_at_reference_best_lr": curves,
        "runs": [runs[key] for key in sorted(runs)],
    }


def markdown(data: dict[str, Any]) -> str:
    c = data["config"]
    budgets = "; ".join(f"{b['updates']} updates, {b['samples']} samples" for b in c["budgets"])
    params = ", ".join(f"{p / 1e6:.2f}M" for p in c["parameters"]) or "?"
    lines = [
        f"Muon study at equal samples ({budgets}; model {params} parameters; validation on the same fixed windows for "
        f"every run): synchronous ZeRO-1 against dpu and acco, with AdamW (zero1, dpu, acco) and with Muon on the blocks' "
        f"2-D matrices + AdamW for the rest (sync_muon, dpu_muon, acco_muon). Peak lrs {', '.join(f'{x:g}' for x in c['lrs'])}; "
        f"seeds {', '.join(map(str, c['seeds']))}. Runs from {', '.join(f'`{p}`' for p in c['runs_files'])}; "
        f"{c['precedence']}: {len(c['replaced'])} replaced."
        + (f" Ignored methods: {', '.join(c['ignored_methods'])}." if c["ignored_methods"] else ""),
        "",
        f"**Answer.** {data['headline']}",
        "",
    ]
    missing = [f"{f}: {', '.join(s['missing'])}" for f, s in data["families"].items() if s["missing"]]
    if missing:
        lines += [f"Missing (no runs): {'; '.join(missing)}.", ""]
    lines += [
        "**Final validation loss per method and peak lr**: mean over seeds, sample std, min–max; *vs reference* = mean / "
        "the family's synchronous reference's mean at the same lr − 1 (AdamW: zero1; Muon: sync_muon); *paired* = per seed "
        "(same initial weights and batches), the method's loss / the reference's − 1: mean (min to max).",
        "",
    ]
    rows = []
    for r in data["results"]:
        lo, hi = r["final_val_loss_spread"]
        std = r["final_val_loss_std"]
        rows.append([r["family"], r["method"], f"{r['lr']:g}", len(r["seeds"]), f"{r['final_val_loss']:.4f}",
                     "–" if std is None else f"{std:.4f}", f"{lo:.4f}–{hi:.4f}", _pct(r["vs_reference"]),
                     _pct_stats(r["paired_vs_reference"]), "–" if r["train_wall_s"] is None else f"{r['train_wall_s']:.1f}"])
    head = ["family", "method", "peak lr", "seeds", "final val loss (mean)", "std", "min–max", "vs reference",
            "paired vs reference", "train s"]
    lines += [report.markdown_table(head, rows), ""]

    gap_rows = []
    for family, s in data["families"].items():
        for role in DELAYED:
            entry = s.get(role)
            if s["reference_best_lr"] is None or entry is None:
                continue
            there, best = entry["at_reference_best_lr"], entry["best_vs_best"]
            gap_rows.append([
                family, entry["method"], f"{s['reference']} {s['reference_best_lr']:g}", f"{s['reference_best_final_val_loss']:.4f}",
                "–" if there is None else f"{there['final_val_loss']:.4f}", _pct(None if there is None else there["gap"]),
                _pct_stats(None if there is None else there["paired_gap"]), _pct(s["reference_relative_std"]).lstrip("+"),
                _verdict(there), f"{entry['best_lr']:g}", f"{best['final_val_loss']:.4f}", _pct(best["gap"]),
                _pct_stats(best["paired_gap"]), _verdict(best)])
    if gap_rows:
        lines += [
            "**Gaps against the family's synchronous reference**: *there* = both at the reference's best lr (lowest mean); "
            "*best vs best* = the method at its own best lr against the reference at its own. *Noise*: within noise if the "
            "paired per-seed gaps range over 0, or if the absolute gap < the reference's relative seed std (std / mean) at its best lr.",
            "",
            report.markdown_table(
                ["family", "method", "reference, best lr", "reference loss", "method loss there", "gap there", "paired gap there",
                 "reference rel. std", "noise there", "method's best lr", "method's best loss", "best vs best",
                 "paired best vs best", "noise best vs best"], gap_rows),
            "",
        ]
    cross = data["muon_vs_adamw"]
    if cross is not None:
        lines += [
            f"**Muon against AdamW, both synchronous, each at its best lr**: sync_muon at {cross['lr']:g} "
            f"({cross['final_val_loss']:.4f}) against zero1 at {cross['reference_lr']:g} ({cross['reference_final_val_loss']:.4f}): "
            f"{_pct(cross['gap'])}, paired {_pct_stats(cross['paired_gap'])}; {_verdict(cross)}.",
            "",
        ]
    if data["speed"]:
        lines += [
            "**Speed**: mean training seconds per run (evaluations excluded) at the family reference's best lr. The runs are "
            "on loopback, so this is the optimizer's CPU cost on this machine, not how well communication is hidden "
            "(see the throughput report for that).",
            "",
            report.markdown_table(["family", "method", "peak lr", "train s", "ms per update", "vs reference"], [
                [r["family"], r["method"], f"{r['lr']:g}", f"{r['train_wall_s']:.1f}", f"{r['ms_per_update']:.1f}",
                 "–" if r["vs_reference"] is None else f"{r['vs_reference']:.2f}×"] for r in data["speed"]]),
            "",
        ]
    if c["replaced"]:
        lines += ["**Replaced runs** (an earlier run of the same method, lr and seed; the later one is used):", "",
                  report.markdown_table(["method", "peak lr", "seed", "used", "replaced", "loss used", "loss replaced"], [
                      [r["method"], f"{r['lr']:g}", r["seed"], f"`{r['new']}`", f"`{r['old']}`",
                       f"{r['new_final_val_loss']:.4f}", f"{r['old_final_val_loss']:.4f}"] for r in c["replaced"]]), ""]
    return "\n".join(lines)


def plot(plt: Any, data: dict[str, Any]) -> None:
    """Left: final validation loss against peak lr (mean; bars min–max over seeds), AdamW solid, Muon
    dashed. Right: validation loss against samples at each family reference's best lr (mean over seeds)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    for i, (family, roles) in enumerate(FAMILIES.items()):
        for j, (role, method) in enumerate(roles.items()):
            rows = sorted((r for r in data["results"] if r["method"] == method), key=lambda r: r["lr"])
            if not rows:
                continue
            shift = 1.0 + 0.02 * (3 * i + j - 2.5)  # side by side on the log axis
            ys = [r["final_val_loss"] for r in rows]
            err = [[y - r["final_val_loss_spread"][0] for y, r in zip(ys, rows)],
                   [r["final_val_loss_spread"][1] - y for y, r in zip(ys, rows)]]
            left.errorbar([r["lr"] * shift for r in rows], ys, yerr=err, marker="o", capsize=3, color=ROLE_COLOURS[role],
                          linestyle=FAMILY_STYLES[family], label=f"{method} ({family})")
    left.set_xscale("log")
    left.set_xlabel("peak learning rate")
    left.set_ylabel("final validation loss (mean; bars: min–max over seeds)")
    left.grid(alpha=0.3, which="both")
    left.legend(fontsize=8)
    left.set_title("final loss against peak lr", fontsize=10)
    for family, curves in data["curves_at_reference_best_lr"].items():
        lr = data["families"][family]["reference_best_lr"]
        for method, curve in curves.items():
            role = family_of(method)[1]  # type: ignore[index]
            right.plot([p["samples"] for p in curve], [p["val_loss"] for p in curve], marker=".", color=ROLE_COLOURS[role],
                       linestyle=FAMILY_STYLES[family], label=f"{method}, lr {lr:g}")
    later = [p["val_loss"] for curves in data["curves_at_reference_best_lr"].values() for curve in curves.values()
             for p in curve if p["samples"] > 0]
    if later:  # the first evaluation (untrained, ~ln 256) would flatten the rest
        low, high = min(later), max(later)
        right.set_ylim(low - 0.05 * (high - low + 1e-9), high + 0.1 * (high - low + 1e-9))
    right.set_xlabel("samples (sequences)")
    right.set_ylabel("validation loss (mean over seeds)")
    right.grid(alpha=0.3, which="both")
    right.legend(fontsize=8)
    right.set_title("curves at each family reference's best lr (the untrained start is off the top)", fontsize=10)
    c = data["config"]
    budgets = ", ".join(f"{b['updates']} updates" for b in c["budgets"])
    fig.suptitle(f"AdamW (solid) and Muon + AdamW (dashed): sync, dpu, acco; {budgets}, seeds {', '.join(map(str, c['seeds']))}",
                 fontsize=10)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    paths = [Path(p) for p in args.runs.split(",") if p]
    data = build(paths, args.json, argv)
    report.write(args.json, data, markdown(data), plot, make_plot=not args.no_plot)
    print(f"[muon study] {data['headline']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
