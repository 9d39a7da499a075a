"""Smoke runs of the benchmark reports: a few steps of every method on loopback (no network
namespaces, no root), world 2, and the JSON schema that the reports promise. Benchmarks are not
tests: nothing here looks at speed."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))
ALL_METHODS = ["compute_only", "ddp", "zero1", "dpu", "acco", "acco_nonblocking"]
RESULT_KEYS = {"method", "samples_per_s", "step_time_s", "overlap_efficiency", "speedup_vs_zero1", "peak_rss_bytes"}
LOOPBACK = ["--network", "loopback", "--world", "2", "--bandwidth", "none", "--model", "nano", "--no-plot", "--timeout", "120"]


def run_report(module: str, tmp_path: Path, *args: str) -> dict:
    """The launcher runs in this process (torch is imported once for all tests); the two ranks are
    subprocesses, stopped by the harness after --timeout seconds."""
    out = tmp_path / f"{module}.json"
    main = importlib.import_module(f"benchmarks.{module}").main
    assert main([*LOOPBACK, "--json", str(out), *args]) == 0
    assert out.with_suffix(".md").read_text().count("|") > 10
    report = json.loads(out.read_text())
    assert isinstance(report["config"], dict) and report["config"]["argv"][:3] == ["python", "-m", f"benchmarks.{module}"]
    assert isinstance(report["results"], list) and report["results"]
    for row in report["results"]:
        assert RESULT_KEYS <= set(row), sorted(RESULT_KEYS - set(row))
        assert row["world"] == 2 and row["network"] == "loopback"
    return report


@pytest.mark.parametrize("module", ["throughput", "heterogeneous"])
def test_throughput_style_reports(module, tmp_path):
    report = run_report(module, tmp_path, "--methods", ",".join(ALL_METHODS), "--batch-size", "2",
                        "--repeats", "1", "--warmup", "1", "--rounds", "2")
    by_method = {row["method"]: row for row in report["results"]}
    assert sorted(by_method) == sorted(ALL_METHODS)
    for row in by_method.values():
        assert row["samples_per_s"] > 0 and row["step_time_s"] > 0 and row["peak_rss_bytes"] > 0
        assert sum(row["calls_per_rank"]) >= 4
    assert by_method["zero1"]["speedup_vs_zero1"] == pytest.approx(1.0)
    assert by_method["compute_only"]["overlap_efficiency"] == pytest.approx(1.0)
    assert len(report["runs"]) == len(ALL_METHODS)


def test_convergence_every_method_trains(tmp_path):
    methods = ["zero1", "acco", "dpu", "ddp", "acco_nonblocking"]
    report = run_report("convergence", tmp_path, "--methods", ",".join(methods), "--updates", "8", "--batch-size", "4",
                        "--eval-every", "4", "--eval-batches", "1", "--max-bytes", "200000")
    by_method = {row["method"]: row for row in report["results"]}
    assert sorted(by_method) == sorted(methods)
    assert by_method["zero1"]["final_val_loss_vs_zero1"] == pytest.approx(0.0)
    for run in report["runs"]:
        first, last = run["curve"][0]["val_loss"], run["curve"][-1]["val_loss"]
        assert math.isfinite(last) and last < first, (run["method"], first, last)
        assert run["samples"] == 8 * 4 * 2  # equal budget: updates x batch x world
    assert {r["method"]: r["calls"] for r in report["runs"]}["acco"] == 16


def test_memory_report(tmp_path):
    report = run_report("memory", tmp_path, "--one-launch", "--methods", "ddp,zero1,acco", "--calls", "2")
    by_method = {row["method"]: row for row in report["results"]}
    assert sorted(by_method) == ["acco", "ddp", "zero1"]
    for row in by_method.values():
        assert row["accounted_bytes"] > 0 and row["formula_bytes"] > 0
    # acco's own accounting against the README: ZeRO-1 + one model-sized buffer + shard-sized extras
    assert by_method["acco"]["accounted_bytes"] <= by_method["acco"]["formula_bytes"]
    assert by_method["acco"]["accounted_vs_zero1_bytes"] <= by_method["acco"]["allowed_over_zero1_bytes"]


def test_schedules_probe(tmp_path):
    out = tmp_path / "schedules.json"
    main = importlib.import_module("benchmarks.schedules").main
    assert main(["--model", "nano", "--updates", "2", "--batch-size", "4", "--eval-batches", "1",
                 "--max-bytes", "200000", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert len(report["results"]) == 4
    for row in report["results"]:
        assert math.isfinite(row["sync_val_loss"]) and math.isfinite(row["acco_val_loss"])


def test_lr_sweep_report_and_estimate_error(tmp_path):
    """2 peak lrs x 1 seed x {zero1, acco}: the report's keys, and acco's estimate-error trace (one finite
    positive ratio per committed update, with its learning rate); --report-only rebuilds the report."""
    updates, lrs = 6, [1e-3, 3e-3]
    args = ["--methods", "zero1,acco", "--lrs", ",".join(map(str, lrs)), "--seeds", "1", "--updates", str(updates),
            "--batch-size", "4", "--eval-every", "3", "--eval-batches", "1", "--max-bytes", "200000"]
    report = run_report("lr_sweep", tmp_path, *args)
    assert report["config"]["lrs"] == "0.001,0.003" and report["config"]["estimate_error"] is True
    cells = {(row["method"], row["lr"]): row for row in report["results"]}
    assert sorted(cells) == sorted((m, lr) for m in ("zero1", "acco") for lr in lrs)
    for (method, lr), row in cells.items():
        assert math.isfinite(row["final_val_loss"]) and row["seeds"] == [1] and row["final_val_loss_std"] is None
        lo, hi = row["final_val_loss_spread"]
        assert lo == hi == row["final_val_loss"]
        assert row["paired_vs_zero1"]["n"] == 1
        if method == "zero1":
            assert row["final_val_loss_vs_zero1"] == pytest.approx(0.0) and "estimate_error" not in row
        else:
            assert math.isfinite(row["final_val_loss_vs_zero1"])
            phases = {"warm-up", "first third", "second third", "last third", "all", "error_norm", "step_norm"}
            assert set(row["estimate_error"]) == phases and row["estimate_error"]["all"] > 0
    (gap,) = report["gaps"]
    assert gap["method"] == "acco" and gap["zero1_best_lr"] in lrs and gap["best_lr"] in lrs
    assert math.isfinite(gap["gap_at_zero1_best_lr"]) and math.isfinite(gap["gap_best_vs_best"])
    assert len(report["runs"]) == 4
    for run in report["runs"]:
        assert run["updates"] == updates and run["samples"] == updates * 4 * 2
        if run["method"] == "zero1":
            assert "estimate_error" not in run
            continue
        trace = run["estimate_error"]
        assert [row["update"] for row in trace] == list(range(1, updates + 1))
        for row in trace:
            assert math.isfinite(row["ratio"]) and row["ratio"] > 0, row
            assert 0 < row["lr"] <= run["lr"] and row["step_norm"] > 0
    out = tmp_path / "lr_sweep.json"
    assert len(out.with_suffix(".runs.jsonl").read_text().splitlines()) == 4
    # the report again, from the runs file alone (and with the plot where matplotlib is installed)
    plotting = importlib.util.find_spec("matplotlib") is not None
    main = importlib.import_module("benchmarks.lr_sweep").main
    assert main([*[a for a in LOOPBACK if a != "--no-plot"], "--json", str(out), "--report-only", *args]) == 0
    rebuilt = json.loads(out.read_text())
    assert rebuilt["results"] == report["results"] and rebuilt["gaps"] == report["gaps"]
    assert out.with_suffix(".png").exists() == plotting


def test_cpu_budget_profile(tmp_path):
    """Nano model, 3 timed calls per mode: every phase that each mode runs is timed on its thread,
    the exclusive phases of a round add up to the round, and the totals are consistent (~7 s)."""
    out = tmp_path / "cpu_budget.json"
    main = importlib.import_module("benchmarks.cpu_budget").main
    assert main(["--network", "loopback", "--model", "nano", "--batch-size", "2", "--warmup", "2", "--calls", "3",
                 "--modes", "acco,dpu,sync", "--timeout", "120", "--json", str(out)]) == 0
    assert out.with_suffix(".md").read_text().count("|") > 10
    report = json.loads(out.read_text())
    assert report["config"]["argv"][:3] == ["python", "-m", "benchmarks.cpu_budget"]
    by_mode = {row["mode"]: row for row in report["results"]}
    assert sorted(by_mode) == ["acco", "dpu", "sync"]
    every_call = ("forward_backward", "step", "hand_over", "stage_gradients", "zero_grad", "call")
    every_round = ("run", "agree", "reduce_scatter", "average", "check_and_measure", "all_gather")
    for mode, row in by_mode.items():
        assert row["world"] == 2 and row["network"] == "loopback" and row["calls"] == 3 and row["rounds"] == 3
        assert len(row["per_rank"]) == 2
        for key in every_call + every_round:
            phase = row["phases"][key]
            assert phase["runs"] == 3 and phase["cpu_ms"] >= 0 and phase["inclusive_wall_ms"] > 0, (mode, key, phase)
        totals = row["totals"]
        assert totals["process_cpu_ms"] >= totals["training_cpu_ms"] > 0 and totals["worker_cpu_ms"] > 0
        assert totals["round_cpu_ms"] > 0 and totals["model_sized_bytes"] > 0
    phases = {mode: row["phases"] for mode, row in by_mode.items()}
    assert phases["acco"]["tentative_step"]["runs"] >= 1 and phases["acco"]["shard_step"]["runs"] >= 1
    assert phases["dpu"]["tentative_step"]["runs"] == 0 and phases["dpu"]["shard_step"]["runs"] == 3
    assert phases["sync"]["install_params"]["runs"] == 0 and phases["acco"]["install_params"]["runs"] == 3
    for run in report["runs"]:  # rank 0's raw records: nested phases are subtracted, never counted twice
        assert len(run["calls"]) == 3 and len(run["rounds"]) == 3
        for record in run["calls"] + run["rounds"]:
            top = "call" if record["kind"] == "call" else "run"
            parts = sum(cpu for cpu, _ in record["exclusive_cpu_wall_ms"].values())
            assert parts == pytest.approx(record["inclusive_cpu_wall_ms"][top][0], abs=0.01), record


def test_muon_study_report_gaps(tmp_path):
    """Synthetic runs (no training): 2 families x 2 lrs x 2 seeds; the gaps, the noise verdicts, the
    precedence of the last file and a missing family, against numbers worked out by hand."""
    losses = {  # method -> lr -> (seed 1, seed 2)
        "zero1": {1e-3: (2.0, 2.2), 2e-3: (1.9, 2.1)},          # best 2e-3, mean 2.0
        "dpu": {1e-3: (2.4, 2.6), 2e-3: (2.5, 2.7)},            # best 1e-3
        "acco": {1e-3: (2.2, 2.2), 2e-3: (1.95, 2.15)},
        "sync_muon": {1e-3: (1.8, 1.9), 2e-3: (1.9, 2.0)},      # best 1e-3, mean 1.85
        "dpu_muon": {1e-3: (1.75, 1.95), 2e-3: (2.0, 2.0)},
        "acco_muon": {1e-3: (1.9, 2.0), 2e-3: (1.85, 1.95)},    # best 2e-3
    }
    seconds = {"sync_muon": (10.0, 12.0), "dpu_muon": (7.0, 9.0), "acco_muon": (9.0, 9.0)}

    def run(method, lr, seed, final):
        return {"world": 2, "network": "loopback", "bandwidth": "unlimited", "bandwidth_bps": None, "parameters": 1000,
                "lr": lr, "method": method, "seed": seed, "updates": 10, "samples": 100, "calls": 10,
                "train_wall_s": seconds.get(method, (5.0, 5.0))[seed - 1], "final_val_loss": final,
                "curve": [{"samples": 0, "updates": 0, "val_loss": 5.0}, {"samples": 100, "updates": 10, "val_loss": final}]}

    lines = [run(m, lr, seed, pair[seed - 1]) for m, by_lr in losses.items() for lr, pair in by_lr.items() for seed in (1, 2)]
    lines.append(run("acco_momentum", 1e-3, 1, 9.0))  # outside the study: ignored
    stale = next(r for r in lines if (r["method"], r["lr"], r["seed"]) == ("dpu_muon", 1e-3, 1))
    first, second = tmp_path / "a.runs.jsonl", tmp_path / "b.runs.jsonl"
    first.write_text("\n".join(json.dumps({**r, "final_val_loss": 3.0} if r is stale else r) for r in lines) + "\n")
    second.write_text(json.dumps(stale) + "\n")  # the last file given wins
    out = tmp_path / "muon_study.json"
    main = importlib.import_module("benchmarks.muon_study").main
    assert main(["--runs", f"{first},{second}", "--json", str(out), "--no-plot"]) == 0
    data = json.loads(out.read_text())
    assert out.with_suffix(".md").read_text().count("|") > 50 and not out.with_suffix(".png").exists()
    assert data["config"]["ignored_methods"] == ["acco_momentum"]
    (replaced,) = data["config"]["replaced"]
    assert replaced["method"] == "dpu_muon" and replaced["old_final_val_loss"] == 3.0 and replaced["new_final_val_loss"] == 1.75
    assert len(data["results"]) == 12 and len(data["runs"]) == 24

    adamw, muon = data["families"]["AdamW"], data["families"]["Muon"]
    assert adamw["reference_best_lr"] == 2e-3 and muon["reference_best_lr"] == 1e-3
    assert adamw["reference_relative_std"] == pytest.approx(math.sqrt(0.02) / 2.0)  # stdev(1.9, 2.1) / 2.0
    dpu = adamw["dpu"]["at_reference_best_lr"]
    assert dpu["gap"] == pytest.approx(2.6 / 2.0 - 1)
    assert dpu["paired_gap"]["min"] == pytest.approx(2.7 / 2.1 - 1) and dpu["paired_gap"]["max"] == pytest.approx(2.5 / 1.9 - 1)
    assert dpu["paired_gap"]["mean"] == pytest.approx((2.5 / 1.9 + 2.7 / 2.1) / 2 - 1) and not dpu["within_noise"]
    best = adamw["dpu"]["best_vs_best"]
    assert adamw["dpu"]["best_lr"] == 1e-3 and best["gap"] == pytest.approx(2.5 / 2.0 - 1)
    assert best["paired_gap"]["mean"] == pytest.approx((2.4 / 1.9 + 2.6 / 2.1) / 2 - 1)
    acco = adamw["acco"]["at_reference_best_lr"]  # +2.5%: both seeds worse, but below zero1's 7.1% seed spread
    assert acco["gap"] == pytest.approx(0.025) and acco["paired_gap"]["min"] > 0
    assert acco["within_noise"] and acco["within_noise_because"] == ["gap below the reference's relative std"]

    assert muon["reference_relative_std"] == pytest.approx(math.sqrt(0.005) / 1.85)
    dpu_m = muon["dpu"]["at_reference_best_lr"]  # equal means; one seed better, one worse
    assert dpu_m["gap"] == pytest.approx(0.0, abs=1e-12)
    assert dpu_m["paired_gap"]["min"] == pytest.approx(1.75 / 1.8 - 1) and dpu_m["paired_gap"]["max"] == pytest.approx(1.95 / 1.9 - 1)
    assert dpu_m["within_noise_because"] == ["paired range includes 0", "gap below the reference's relative std"]
    acco_m = muon["acco"]["at_reference_best_lr"]
    assert acco_m["gap"] == pytest.approx(1.95 / 1.85 - 1) and not acco_m["within_noise"]
    assert muon["acco"]["best_lr"] == 2e-3 and muon["acco"]["best_vs_best"]["gap"] == pytest.approx(1.9 / 1.85 - 1)
    cross = data["muon_vs_adamw"]
    assert (cross["lr"], cross["reference_lr"]) == (1e-3, 2e-3) and cross["gap"] == pytest.approx(1.85 / 2.0 - 1)
    assert cross["paired_gap"]["mean"] == pytest.approx((1.8 / 1.9 + 1.9 / 2.1) / 2 - 1)

    speed = {r["method"]: r for r in data["speed"]}
    assert speed["dpu_muon"]["train_wall_s"] == pytest.approx(8.0) and speed["dpu_muon"]["vs_reference"] == pytest.approx(8 / 11)
    assert data["headline"].startswith("With Muon on the matrices, dpu is +0.00% (within noise) and acco +5.41% (outside noise)")
    assert "against +30.00% (outside noise) and +2.50% (within noise) with AdamW" in data["headline"]
    assert "needs no estimate round: 8.0 s" in data["headline"]
    assert data["curves_at_reference_best_lr"]["Muon"]["dpu_muon"] == [{"samples": 0, "val_loss": 5.0},
                                                                        {"samples": 100, "val_loss": pytest.approx(1.85)}]

    # the AdamW runs alone: the Muon family is reported missing, nothing fails
    adamw_only = tmp_path / "adamw.runs.jsonl"
    adamw_only.write_text("\n".join(json.dumps(r) for r in lines if r["method"] in ("zero1", "dpu", "acco")) + "\n")
    assert main(["--runs", str(adamw_only), "--json", str(tmp_path / "alone.json"), "--no-plot"]) == 0
    alone = json.loads((tmp_path / "alone.json").read_text())
    assert alone["families"]["Muon"]["missing"] == ["sync_muon", "dpu_muon", "acco_muon"]
    assert alone["muon_vs_adamw"] is None and alone["headline"].startswith("No answer yet")


def test_estimate_study_simulates_what_the_optimizer_computes(tmp_path):
    """The single-process simulation of issue 14's study against the real thing: its ``acco`` rule
    lands where AccoOptimizer (two ranks on loopback) lands on the same model, data, schedule and
    validation windows. (Its ``sync`` rule steps at acco's commit rates, half an update later
    than zero1's, so that the rules differ only in where the first half is computed.)"""
    updates = 6
    common = ["--updates", str(updates), "--batch-size", "4", "--eval-every", "3", "--eval-batches", "1",
              "--max-bytes", "200000", "--seeds", "1", "--lrs", "0.003"]
    sweep = run_report("lr_sweep", tmp_path, "--methods", "zero1,acco", *common)
    real = {run["method"]: run["final_val_loss"] for run in sweep["runs"]}
    out = tmp_path / "study.json"
    main = importlib.import_module("benchmarks.estimate_study").main
    study = ["--model", "nano", "--rules", "sync,acco,flip,oracle,carry:0.5", "--val-seed", "0", "--curvature-every", "2"]
    assert main([*study, "--json", str(out), *common]) == 0
    runs = {run["rule"]: run for run in json.loads(out.read_text())["runs"]}
    assert runs["acco"]["final_val_loss"] == pytest.approx(real["acco"], rel=1e-4)
    assert runs["acco"]["final_val_loss"] != pytest.approx(runs["sync"]["final_val_loss"], rel=1e-6)
    for rule in ("acco", "flip", "oracle", "carry:0.5"):
        assert runs[rule]["estimate_error_median"] > 0 and -1 <= runs[rule]["error_cosine_median"] <= 1
        assert len(runs[rule]["curvature"]) == 2 and math.isfinite(runs[rule]["curvature_ratio_median"])
    assert runs["sync"]["estimate_error_median"] is None
    assert out.with_suffix(".md").read_text().count("|") > 10


def test_the_simulators_secant_both_is_what_the_optimizer_option_computes(tmp_path):
    """Issue 22's evidence for ``correction="secant"`` comes from the simulator's ``secant:both`` rule: the real
    optimizer (two ranks on loopback, ``acco_secant``) lands where that rule lands, and not where ``acco`` does;
    likewise ``correction="secant-gated"`` and ``secant:gate0.9``."""
    common = ["--updates", "8", "--batch-size", "4", "--eval-every", "4", "--eval-batches", "1",
              "--max-bytes", "200000", "--seeds", "1", "--lrs", "0.01"]
    sweep = run_report("lr_sweep", tmp_path, "--methods", "acco_secant,acco_secant_gated", *common)
    real, gated = (next(r["final_val_loss"] for r in sweep["runs"] if r["method"] == m) for m in ("acco_secant", "acco_secant_gated"))
    out = tmp_path / "study.json"
    main = importlib.import_module("benchmarks.estimate_study").main
    assert main(["--model", "nano", "--rules", "acco,secant:both,secant:gate0.9", "--val-seed", "0", "--json", str(out), *common]) == 0
    runs = {run["rule"]: run["final_val_loss"] for run in json.loads(out.read_text())["runs"]}
    assert runs["secant:both"] == pytest.approx(real, rel=1e-4)
    assert runs["acco"] != pytest.approx(real, rel=1e-4)
    assert runs["secant:gate0.9"] == pytest.approx(gated, rel=1e-4)
    assert runs["secant:gate0.9"] != pytest.approx(real, rel=1e-4)


def test_estimate_study_commit_rules(tmp_path):
    """Issue 22 part 2's rules: at their neutral values they are acco's equations; otherwise they train
    differently; secant reports its κ, and runs at another β₁ are keyed and labelled apart."""
    common = ["--model", "nano", "--updates", "4", "--batch-size", "4", "--eval-every", "4", "--eval-batches", "1",
              "--max-bytes", "200000", "--seeds", "1", "--lrs", "0.003", "--val-seed", "0"]
    out = tmp_path / "rules.json"
    main = importlib.import_module("benchmarks.estimate_study").main
    rules = "acco,weighted:0.5,damp:1,shift:0,weighted:0.25,damp:0.5,shift:0.5,secant,secant:tensor,secant:row,secant:tensor-ema0.9"
    assert main([*common, "--rules", rules, "--json", str(out)]) == 0
    assert main([*common, "--rules", "acco", "--beta1", "0.95", "--json", str(out)]) == 0
    assert main([*common, "--rules", "acco", "--beta1", "0.95", "--beta2", "0.99", "--json", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    loss = {(r["rule"], r["beta1"]): r["final_val_loss"] for r in runs if r.get("beta2", 0.95) == 0.95}
    other_beta2 = [r for r in runs if r.get("beta2", 0.95) == 0.99]
    assert len(other_beta2) == 1 and other_beta2[0]["final_val_loss"] != loss[("acco", 0.95)]
    for neutral in ("weighted:0.5", "damp:1", "shift:0"):
        assert loss[(neutral, 0.9)] == pytest.approx(loss[("acco", 0.9)], rel=1e-6)
    for rule in ("weighted:0.25", "damp:0.5", "shift:0.5", ("acco", 0.95)):
        assert loss[rule if isinstance(rule, tuple) else (rule, 0.9)] != pytest.approx(loss[("acco", 0.9)], rel=1e-7)
    for secant in (r for r in runs if r["rule"].startswith("secant")):
        assert 0 <= secant["kappa_negative_fraction"] <= 1 and secant["kappa_correction_share_median"] >= 0
    assert "acco β₁=0.95 |" in out.with_suffix(".md").read_text() and "acco β₁=0.95 β₂=0.99 |" in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit):
        main([*common, "--rules", "weighted", "--json", str(out)])


def test_checkpoint_io_report(tmp_path):
    """Both launches (timing, memory) of the checkpoint report, every method and operation, on the nano model."""
    out = tmp_path / "checkpoint_io.json"
    main = importlib.import_module("benchmarks.checkpoint_io").main
    assert main([*LOOPBACK, "--json", str(out), "--repeats", "1", "--calls", "2", "--dir", str(tmp_path / "ckpt")]) == 0
    report = json.loads(out.read_text())
    assert report["config"]["argv"][:3] == ["python", "-m", "benchmarks.checkpoint_io"]
    rows = {(row["method"], row["operation"]): row for row in report["results"]}
    assert sorted(rows) == sorted((m, op) for m in ("consolidated", "dcp", "dcp_async") for op in ("save", "load"))
    for (method, operation), row in rows.items():
        assert row["world"] == 2 and row["time_s"] > 0
        assert len(row["alloc_peak_bytes"]) == len(row["rss_peak_bytes"]) == len(row["alloc_held_after_bytes"]) == 2
        assert (row["call_s"] is None) == (operation == "load")
    assert rows[("dcp", "save")]["file_bytes"] > 0 and rows[("consolidated", "save")]["file_bytes"] > 0
    assert out.with_suffix(".md").read_text().count("|") > 40


def test_noise_scale_check_measures_without_changing_the_training(tmp_path):
    """Issue 22 part 3's simulator check: its acco run trains exactly as ``benchmarks.estimate_study``'s
    ``acco`` rule does (the estimator and the probes read only), and its report carries every column."""
    common = ["--model", "nano", "--updates", "6", "--batch-size", "4", "--eval-every", "3", "--eval-batches", "1",
              "--max-bytes", "200000", "--seeds", "1", "--val-seed", "0"]
    study_out, check_out = tmp_path / "study.json", tmp_path / "check.json"
    assert importlib.import_module("benchmarks.estimate_study").main([*common, "--lrs", "0.003", "--rules", "acco", "--json", str(study_out)]) == 0
    check = ["--lr", "0.003", "--check-at", "2,5", "--direct-micro-batches", "16", "--pairs", "3", "--windows", "3,5,30",
             "--window-size", "3", "--window-micro-batches", "16", "--json", str(check_out)]
    assert importlib.import_module("benchmarks.noise_scale_check").main([*common, *check]) == 0
    study = json.loads(study_out.read_text())["runs"][0]
    report = json.loads(check_out.read_text())
    run = report["runs"][0]
    assert run["final_val_loss"] == study["final_val_loss"]
    assert [c["update"] for c in run["checkpoints"]] == [2, 5]
    for c in run["checkpoints"]:
        assert c["direct"]["trace_sigma"] > 0 and c["pairs_acco"] is not None and math.isfinite(c["acco_vs_sync"]["trace_sigma_bias"])
    assert run["windows"] == [3, 5]  # whole windows only
    full = json.loads(check_out.with_suffix(".runs.jsonl").read_text().splitlines()[0])  # per-update series live there
    assert sorted(d["update"] for d in full["direct_per_update"]) == [1, 2, 3, 4, 5] and len(full["per_update"]) == 6
    assert report["summary"]["tally"]["pairs_sync"]["n"] == 2 and report["summary"]["tally"]["window_plain"]["n"] == 2
    assert check_out.with_suffix(".md").read_text().count("|") > 20


def test_gap_by_batch_runs_zero1_then_acco_at_its_best_rate(tmp_path):
    """Issue 22 part 1's first slice: zero1 over each batch size's bracket, acco at zero1's best."""
    out = tmp_path / "gap.json"
    args = ["--model", "nano", "--grid", "4:1e-3,1e-2;8:1e-2", "--seeds", "1", "--updates", "4", "--eval-every", "2",
            "--eval-batches", "1", "--max-bytes", "200000", "--lock", "", "--json", str(out)]
    assert importlib.import_module("benchmarks.gap_by_batch").main(args) == 0
    report = json.loads(out.read_text())
    rows = {row["batch_per_rank"]: row for row in report["summary"]["batches"]}
    assert set(rows) == {4, 8} and rows[8]["bracketed"] is False
    acco = [r for r in report["runs"] if r["rule"] == "acco"]
    assert sorted((r["batch_size"], r["lr"]) for r in acco) == sorted((b, rows[b]["best_lr"]) for b in rows)
    assert all(math.isfinite(g) for row in rows.values() for g in row["gaps_percent"])
    assert "Partial" in out.with_suffix(".md").read_text()
    plot_out = tmp_path / "gap_vs_noise.json"  # the plot and user table, over the cells just run
    assert importlib.import_module("benchmarks.gap_vs_noise_scale").main(
        ["--setup", f"nano={out}", "--no-plot", "--json", str(plot_out)]) == 0
    plotted = json.loads(plot_out.read_text())
    assert [c["batch_per_rank"] for c in plotted["cells"]] == sorted(rows, key=lambda b: rows[b]["batch_over_b_simple"])
    assert [c["gap_mean_percent"] for c in plotted["cells"]] == [rows[c["batch_per_rank"]]["gap_mean_percent"] for c in plotted["cells"]]
    # another slice of the corpus is another set of runs, not the cached ones of the first slice
    assert importlib.import_module("benchmarks.gap_by_batch").main([*args[:-2], "--grid", "8:1e-2", "--data-skip", "1000", "--json", str(out)]) == 0
    again = json.loads(out.read_text())["runs"]
    assert sorted(r["rule"] for r in again) == ["acco", "zero1"] and {r["data_skip"] for r in again} == {1000}
    assert importlib.import_module("benchmarks.gap_by_batch").main([*args[:-2], "--grid", "8:1e-3", "--zero1-only", "--json", str(out)]) == 0
    assert [(r["rule"], r["lr"]) for r in json.loads(out.read_text())["runs"] if r["batch_size"] == 8] == [("zero1", 1e-2), ("acco", 1e-2), ("zero1", 1e-3)]


def test_the_user_threshold_is_where_every_larger_cell_is_within():
    from benchmarks.gap_vs_noise_scale import threshold_above

    cells = [{"batch_over_b_simple": x, "gap": g} for x, g in ((0.5, 1.4), (1.9, 0.3), (3.0, 18.5), (7.6, 0.2), (10.0, -0.4))]
    assert threshold_above(cells, "gap", 0.5) == 7.6  # 1.9 is within, but 3.0 above it is not
    assert threshold_above(cells[:3], "gap", 0.5) is None
    assert threshold_above(cells, "gap", 20.0) == 0.5
    tied = [{"batch_over_b_simple": 3.0, "gap": 0.1}, {"batch_over_b_simple": 3.0, "gap": 4.0}, {"batch_over_b_simple": 9.0, "gap": 0.2}]
    assert threshold_above(tied, "gap", 0.5) == 9.0 and threshold_above(tied[::-1], "gap", 0.5) == 9.0  # order-free
    assert threshold_above([{"batch_over_b_simple": 2.0, "gap": math.nan}], "gap", 0.5) is None  # NaN is not within
    assert threshold_above([{"batch_over_b_simple": math.nan, "gap": 9.0}, {"batch_over_b_simple": 2.0, "gap": 0.1}], "gap", 0.5) == 2.0


def test_linear_stability_solves_its_model_as_a_long_simulation_does():
    """The stationary loss the Lyapunov solve gives against the same recurrence run for many steps with random
    noise (an independent estimate), and the limits it reports: sync's own (f = 1) and acco's near half of it."""
    from benchmarks import linear_stability as model

    beta, f = 0.9, 0.3
    a = f * 2 * (1 + beta) / (1 - beta)
    generator = torch.Generator().manual_seed(0)
    for rule in ("sync", "acco", "weighted:0.25"):
        solved, radius = model.stationary(a, beta, rule)
        assert radius < 1 and solved is not None
        A, B = model.linear_system(a, beta, rule)
        x, total, steps, burn_in = torch.zeros(3, 512, dtype=torch.float64), 0.0, 6000, 500
        for t in range(steps):  # 512 independent chains at once
            x = A @ x + B @ torch.randn(2, 512, generator=generator, dtype=torch.float64)
            if t >= burn_in:
                total += float(0.5 * x[0].square().mean())
        assert total / (steps - burn_in) == pytest.approx(solved, rel=0.05), rule
    assert model.limit_fraction(beta, "sync") > 0.999
    assert 0.45 < model.limit_fraction(beta, "acco") < 0.6
    assert model.stationary(0.9 * 2 * (1 + beta) / (1 - beta), beta, "acco")[0] is None


def test_gap_by_batch_acco_at_more_rates_and_the_damped_estimate(tmp_path):
    """Issue 22 part 1: ``--acco-lrs`` runs acco beside zero1 at more rates (never where zero1 did not
    run), the report's gap-against-rate table pairs them, ``--confirm`` places a real run beside the
    simulator's; estimate_study's ``damp:<α>`` rule (part 2) moves the estimate a fraction of the way."""
    out = tmp_path / "gap.json"
    common = ["--model", "nano", "--seeds", "1", "--updates", "4", "--eval-every", "2", "--eval-batches", "1", "--max-bytes", "200000"]
    args = [*common, "--grid", "4:1e-3,1e-2", "--acco-lrs", "1e-3,1e-2,5e-3", "--lock", "", "--json", str(out)]
    assert importlib.import_module("benchmarks.gap_by_batch").main(args) == 0
    report = json.loads(out.read_text())
    assert sorted(r["lr"] for r in report["runs"] if r["rule"] == "acco") == [1e-3, 1e-2]
    rows = {row["lr"]: row for row in report["summary"]["gap_by_lr"]}
    assert set(rows) == {1e-3, 1e-2} and sum(row["best"] for row in rows.values()) == 1
    assert all(math.isfinite(row["gap_mean_percent"]) for row in rows.values())
    acco = next(r for r in report["runs"] if r["rule"] == "acco" and r["lr"] == 1e-2)
    confirm = tmp_path / "real.json"  # a stand-in for a benchmarks.lr_sweep report of the same cell
    confirm.write_text(json.dumps({"config": {"model": "nano", "updates": 4, "batch_size": 4, "val_seed": 0}, "runs": [
        {"method": "acco", "lr": 1e-2, "seed": 1, "world": "2", "final_val_loss": acco["final_val_loss"] * 1.01, "train_wall_s": 1.0,
         "curve": [{"updates": 0, "val_loss": 9.0}, {"updates": 4, "val_loss": 1.0}],
         "estimate_error": [{"update": 1, "ratio": 1.0}, {"update": 2, "ratio": 0.3}]}]}))
    assert importlib.import_module("benchmarks.gap_by_batch").main([*args, "--report-only", "--confirm", str(confirm)]) == 0
    (row,) = json.loads(out.read_text())["summary"]["confirmations"]
    assert row["real_over_simulator"] == pytest.approx(0.01) and row["estimate_error_median"] == 0.3
    elsewhere = tmp_path / "real_other_slice.json"  # the same cell on another slice of the corpus is not a confirmation
    report_of = json.loads(confirm.read_text())
    elsewhere.write_text(json.dumps(report_of | {"config": report_of["config"] | {"data_skip": 1000}}))
    assert importlib.import_module("benchmarks.gap_by_batch").main([*args, "--report-only", "--confirm", str(elsewhere)]) == 0
    assert "confirmations" not in json.loads(out.read_text())["summary"]
    study = tmp_path / "study.json"
    assert importlib.import_module("benchmarks.estimate_study").main(
        [*common, "--batch-size", "4", "--lrs", "0.01", "--rules", "acco,damp:1,damp:0.5", "--val-seed", "0", "--json", str(study)]) == 0
    runs = {r["rule"]: r for r in json.loads(study.read_text())["runs"]}
    assert runs["damp:1"]["final_val_loss"] == runs["acco"]["final_val_loss"] == acco["final_val_loss"]
    assert runs["damp:0.5"]["final_val_loss"] != runs["acco"]["final_val_loss"] and runs["damp:0.5"]["batch_size"] == 4


def test_secant_study_pairs_the_gaps_by_seed(tmp_path):
    """The report of issue 22 part 2 from runs files of both kinds (lr_sweep's ``method``, the simulators'
    ``rule`` and ``batch_size``): per-seed gaps to the reference, their means and the share recovered."""
    real, simulated = tmp_path / "real.runs.jsonl", tmp_path / "sim.runs.jsonl"
    rows = [("zero1", 1, 2.0), ("acco", 1, 2.2), ("acco_secant", 1, 2.1), ("zero1", 2, 1.0), ("acco", 2, 1.1), ("acco_secant", 2, 1.0)]
    real.write_text("".join(json.dumps({"method": m, "lr": 1e-3, "seed": s, "final_val_loss": v}) + "\n" for m, s, v in rows))
    simulated.write_text("".join(json.dumps({"rule": m, "lr": 1e-3, "seed": 1, "batch_size": b, "final_val_loss": v}) + "\n"
                                 for m, b, v in [("zero1", 64, 1.0), ("acco", 64, 1.2), ("secant:both", 64, 1.05), ("acco", 16, 9.0)]))
    out = tmp_path / "study.json"
    main = importlib.import_module("benchmarks.secant_study").main
    assert main(["--family", f"real|zero1,acco,acco_secant|{real}", "--family", f"sim|zero1,acco,secant:both|{simulated}|batch=64",
                 "--json", str(out)]) == 0
    real_row, sim_row = (family["rows"][0] for family in json.loads(out.read_text())["families"])
    assert real_row["acco_gaps"] == pytest.approx([0.1, 0.1]) and real_row["corrected_gaps"] == pytest.approx([0.05, 0.0])
    assert real_row["recovered"] == pytest.approx(0.75) and real_row["corrected_better_on"] == 2
    assert sim_row["acco_gap"] == pytest.approx(0.2) and sim_row["recovered"] == pytest.approx(0.75)
    assert "| 0.001 | 1,2 |" in out.with_suffix(".md").read_text()
