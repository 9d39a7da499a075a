"""Smoke run of the GPU check's benchmark on the CPU (nano model, a few steps) and the JSON schema it
promises; and a syntax check of the shell script that drives it on a GPU machine. Nothing here
looks at speed."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["compute_only", "sync", "dpu", "acco", "zero1"]
RESULT_KEYS = {"method", "step_time_s", "step_time_s_spread", "samples_per_s", "ratio_to_compute_only", "ratio_to_sync",
               "peak_memory_bytes", "memory_vs_zero1", "final_loss"}


@pytest.mark.parametrize("dtype", ["bf16", "bf16-autocast"])
def test_gpu_bench_on_cpu(tmp_path, dtype):
    # A subprocess: the benchmark initialises a (1-rank, gloo) default process group of its own.
    out = tmp_path / "x.json"
    argv = ["--device", "cpu", "--model", "nano", "--dtype", dtype, "--steps", "2", "--warmup", "1", "--repeats", "1",
            "--max-bytes", "200000", "--json", str(out)]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_bench", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("[gpu_bench] repeat 1/1") == len(METHODS)

    report = json.loads(out.read_text())
    config = report["config"]
    assert config["argv"][:3] == ["python", "-m", "benchmarks.gpu_bench"] and config["argv"][3:] == argv
    assert config["device"] == "cpu" and config["dtype"] == dtype and config["parameters"] > 0
    assert config["batch_size"] == 4 and config["steps"] == 2 and config["repeats"] == 1 and config["errors"] == {}
    by_method = {row["method"]: row for row in report["results"]}
    assert list(by_method) == METHODS
    for name, row in by_method.items():
        assert RESULT_KEYS <= set(row), (name, sorted(RESULT_KEYS - set(row)))
        assert row["error"] is None
        for key in ("step_time_s", "samples_per_s", "ratio_to_compute_only", "ratio_to_sync", "memory_vs_zero1"):
            assert math.isfinite(row[key]) and row[key] > 0, (name, key, row[key])
        assert row["peak_memory_bytes"] > 0 and math.isfinite(row["final_loss"])
        assert row["step_time_s_spread"][0] <= row["step_time_s"] <= row["step_time_s_spread"][1]
    assert by_method["compute_only"]["ratio_to_compute_only"] == pytest.approx(1.0)
    assert by_method["sync"]["ratio_to_sync"] == pytest.approx(1.0)
    assert by_method["zero1"]["memory_vs_zero1"] == pytest.approx(1.0)
    for name in ("sync", "dpu", "acco"):
        assert by_method[name]["optimizer_memory_bytes"]["total"] > 0
    # 3 calls (1 warm-up, 2 timed), then finish(): one update per call in sync and dpu; in mode acco
    # calls 1-2 make one update and finish() commits call 3's estimate gradients
    assert [by_method[name]["updates"] for name in ("sync", "dpu", "acco")] == [3, 3, 2]

    table = out.with_suffix(".md").read_text()
    assert table.count("|") > 50 and all(f"| {name} |" in table for name in METHODS)


def test_gpu_check_script_syntax():
    script = ROOT / "benchmarks" / "gpu_check.sh"
    assert os.access(script, os.X_OK), "benchmarks/gpu_check.sh should be executable"
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    proc = subprocess.run([bash, "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("transient", [False, True], ids=["chunked", "shard-sized float64 copy"])
def test_gpu_memory_check_on_cpu(tmp_path, monkeypatch, transient):
    """The GPU check's memory benchmark on CPU (a tiny model, rounds on the stream engine): every check
    passes; and a shard-sized float64 copy in the round's norm (the transient of issue 24) fails the
    round check. Small norm pieces on both sides make the tiny shard many pieces long."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import acco.round
    from benchmarks import gpu_memory

    monkeypatch.setattr(acco.round, "_NORM_CHUNK", 4096)
    monkeypatch.setattr(gpu_memory, "NORM_CHUNK", 4096)
    if transient:
        monkeypatch.setattr(acco.round, "_NORM_CHUNK", 1 << 30)  # one piece: a float64 copy of the whole shard
    out = tmp_path / "gpu_memory.json"
    code = gpu_memory.main(["--device", "cpu", "--layers", "4", "--width", "256", "--rows", "64", "--calls", "3", "--json", str(out)])
    report = json.loads(out.read_text())
    verdicts = {row["check"]: row["passed"] for row in report["checks"]}
    assert set(verdicts) == {"held", "round", "run"}
    assert report["acco"]["master_dtype"] == "torch.float32" and report["acco"]["engine"] == "stream"
    if transient:
        assert code == 1 and verdicts["round"] is False and verdicts["held"] is True
    else:
        assert code == 0 and all(verdicts.values()), report["checks"]
    assert out.with_suffix(".md").read_text().count("|") > 20
