#!/usr/bin/env bash
# The GPU check of issue #6 in one go, from the repository root of a machine with a CUDA GPU:
#
#     bash benchmarks/gpu_check.sh [OUTDIR]        (default OUTDIR=benchmarks/results)
#
# 1. the GPU and the versions; 2. the CUDA tests (tests/test_cuda.py); 3. benchmarks.gpu_bench on
# gpt125m in bf16 (then bf16-autocast if time is left); 4. the tables. Everything is bounded by
# `timeout` so that the whole takes at most BUDGET_S seconds (default 440, under 8 minutes with
# the grace periods).
# Uses the machine's python3 (no venv) and installs nothing. A failing step does not stop the
# next ones; the exit status is non-zero if the tests or the bf16 benchmark failed (the autocast
# run is a bonus, and so is the ZeRO-1 baseline, the only NCCL user at world size 1: their
# failures are reported, not fatal).
set -euo pipefail

OUTDIR="${1:-benchmarks/results}"
BUDGET_S="${BUDGET_S:-440}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUTDIR"
rm -f "$OUTDIR"/gpu_check.{json,md} "$OUTDIR"/gpu_check_autocast.{json,md}  # no stale tables
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
failed=()    # make the exit status non-zero
warnings=()  # reported only

left() { echo $((BUDGET_S - SECONDS)); }
smaller() { if (($1 < $2)); then echo "$1"; else echo "$2"; fi; }

echo "== 1. device ($(date -u +%FT%TZ), $(pwd))"
if command -v nvidia-smi >/dev/null; then
    timeout -k 5 30 nvidia-smi -L || echo "nvidia-smi -L failed"
else
    echo "no nvidia-smi on PATH"
fi
if ! timeout -k 5 60 python3 - <<'PY'
import sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| torch.cuda.is_available():", torch.cuda.is_available())
if not torch.cuda.is_available():
    sys.exit("no CUDA GPU visible to torch: this script checks the GPU path, stopping")
print("device 0:", torch.cuda.get_device_name(0))
PY
then
    echo "FAILED: no usable GPU (see above)" >&2
    exit 2
fi

echo
echo "== 2. CUDA tests (timeout 240 s)"
rc=0
timeout -k 10 240 python3 -m pytest -v --timeout=90 --durations=15 tests/test_cuda.py -rs 2>&1 | tee "$OUTDIR/gpu_tests.log" || rc=$?
echo "tests exit status: $rc"
((rc == 0)) || failed+=("tests (exit $rc)")

echo
t=$(smaller 240 $(($(left) - 70)))  # keep ~1 min for the autocast run
echo "== 3a. benchmark, bf16 parameters (timeout $t s)"
rc=0
if ((t < 30)); then
    rc=124
    echo "no time left for the benchmark: $(left) s of $BUDGET_S"
else
    timeout -k 10 "$t" python3 -m benchmarks.gpu_bench --device cuda --model gpt125m --dtype bf16 \
        --json "$OUTDIR/gpu_check.json" 2>&1 | tee "$OUTDIR/gpu_bench.log" || rc=$?
fi
echo "benchmark exit status: $rc"
if ((rc == 3)); then
    warnings+=("benchmark bf16: the zero1 baseline failed (see gpu_bench.log); the other methods ran")
elif ((rc != 0)); then
    failed+=("benchmark bf16 (exit $rc)")
fi

echo
t=$(smaller 120 $(($(left) - 10)))
rc=0
if ((t < 45)); then
    echo "== 3b. benchmark, bf16 autocast: skipped, $(left) s left"
    warnings+=("benchmark bf16-autocast skipped: no time left")
else
    echo "== 3b. benchmark, bf16 autocast (timeout $t s)"
    timeout -k 10 "$t" python3 -m benchmarks.gpu_bench --device cuda --model gpt125m --dtype bf16-autocast \
        --json "$OUTDIR/gpu_check_autocast.json" 2>&1 | tee "$OUTDIR/gpu_bench_autocast.log" || rc=$?
    echo "benchmark (autocast) exit status: $rc"
    ((rc == 0)) || warnings+=("benchmark bf16-autocast failed (exit $rc; not fatal; 3: zero1 only)")
fi

echo
echo "== 4. tables"
for md in "$OUTDIR/gpu_check.md" "$OUTDIR/gpu_check_autocast.md"; do
    if [[ -f "$md" ]]; then
        echo "--- $md"
        cat "$md"
        echo
    fi
done

echo "== done in ${SECONDS} s; outputs in $OUTDIR"
if ((${#warnings[@]})); then
    printf 'WARNING: %s\n' "${warnings[@]}" >&2
fi
if ((${#failed[@]})); then
    printf 'FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "all steps passed"
