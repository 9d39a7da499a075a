"""Smoke runs of the benchmark reports: a few steps of every method on loopback (no network
namespaces, no root), world 2, and the JSON schema that the reports promise. Benchmarks are not
tests: nothing here looks at speed."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

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
