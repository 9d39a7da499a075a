#!/usr/bin/env bash
# The GPU check (issues 6 and 24) in one call of at most 8 minutes, from the repository root of a
# machine with a CUDA GPU. The first thing to run whenever a GPU is available:
#
#     bash benchmarks/gpu_check.sh [OUTDIR]        (default OUTDIR=benchmarks/results)
#
# 1. the GPU and the versions;
# 2. the CUDA tests (tests/test_cuda.py): stream engine against the reference, no host
#    synchronisation in step() (sync debug mode), overlap of a round with the next compute (CUDA
#    events, printed), a round's allocation peak against memory_bytes(), step() under a side
#    stream, checkpoints in host memory, bf16 parameters with an fp32 master;
# 3. benchmarks.gpu_memory: the allocator's peak against the README's formula, on a model of a few
#    GB (about half the GPU held by acco; bf16 parameters, fp32 master): held, per round, per call;
# 4. benchmarks.gpu_bench on gpt125m in bf16 (fp32 master): step time of compute only / sync / dpu /
#    acco / zero1, overlap (vs compute_only) on the stream engine, peak memory against ZeRO-1;
#    then bf16-autocast if time is left; 5. the tables.
# Every step is bounded by `timeout` so that the whole takes at most BUDGET_S seconds (default 450).
# Uses the machine's python3 (no venv) and installs nothing. A failing step does not stop the next
# ones; the exit status is non-zero if the tests, the memory checks or the bf16 benchmark failed
# (the autocast run is a bonus, and so is the ZeRO-1 baseline, the only NCCL user at world size 1:
# their failures are reported, not fatal).
set -euo pipefail

OUTDIR="${1:-benchmarks/results}"
BUDGET_S="${BUDGET_S:-450}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUTDIR"
rm -f "$OUTDIR"/gpu_check.{json,md} "$OUTDIR"/gpu_check_autocast.{json,md} "$OUTDIR"/gpu_memory.{json,md}  # no stale tables
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
      "| torch.cuda.is_available():", torch.cuda.is_available(), "| GPUs:", torch.cuda.device_count())
if not torch.cuda.is_available():
    sys.exit("no CUDA GPU visible to torch: this script checks the GPU path, stopping")
props = torch.cuda.get_device_properties(0)
print("device 0:", props.name, f"{props.total_memory / 2**30:.0f} GiB")
PY
then
    echo "FAILED: no usable GPU (see above)" >&2
    exit 2
fi

echo
echo "== 2. CUDA tests (timeout 200 s)"
rc=0
timeout -k 10 200 python3 -m pytest -v -s --timeout=90 --durations=15 tests/test_cuda.py -rs 2>&1 | tee "$OUTDIR/gpu_tests.log" || rc=$?
echo "tests exit status: $rc"
((rc == 0)) || failed+=("tests (exit $rc)")

echo
t=$(smaller 100 $(($(left) - 150)))  # keep 2.5 min for the benchmark
echo "== 3. memory: allocator peaks against the README's formula (timeout $t s)"
rc=0
if ((t < 30)); then
    rc=124
    echo "no time left for the memory check: $(left) s of $BUDGET_S"
else
    timeout -k 10 "$t" python3 -m benchmarks.gpu_memory --device cuda --dtype bf16 \
        --json "$OUTDIR/gpu_memory.json" 2>&1 | tee "$OUTDIR/gpu_memory.log" || rc=$?
fi
echo "memory check exit status: $rc"
((rc == 0)) || failed+=("memory checks (exit $rc)")

echo
t=$(smaller 170 $(($(left) - 60)))  # keep ~1 min for the autocast run
echo "== 4a. benchmark, bf16 parameters, fp32 master (timeout $t s)"
rc=0
if ((t < 30)); then
    rc=124
    echo "no time left for the benchmark: $(left) s of $BUDGET_S"
else
    timeout -k 10 "$t" python3 -m benchmarks.gpu_bench --device cuda --model gpt125m --dtype bf16 --repeats 2 \
        --json "$OUTDIR/gpu_check.json" 2>&1 | tee "$OUTDIR/gpu_bench.log" || rc=$?
fi
echo "benchmark exit status: $rc"
if ((rc == 3)); then
    warnings+=("benchmark bf16: the zero1 baseline failed (see gpu_bench.log); the other methods ran")
elif ((rc != 0)); then
    failed+=("benchmark bf16 (exit $rc)")
fi

echo
t=$(smaller 100 $(($(left) - 10)))
rc=0
if ((t < 45)); then
    echo "== 4b. benchmark, bf16 autocast: skipped, $(left) s left"
    warnings+=("benchmark bf16-autocast skipped: no time left")
else
    echo "== 4b. benchmark, bf16 autocast (timeout $t s)"
    timeout -k 10 "$t" python3 -m benchmarks.gpu_bench --device cuda --model gpt125m --dtype bf16-autocast --repeats 1 \
        --json "$OUTDIR/gpu_check_autocast.json" 2>&1 | tee "$OUTDIR/gpu_bench_autocast.log" || rc=$?
    echo "benchmark (autocast) exit status: $rc"
    ((rc == 0)) || warnings+=("benchmark bf16-autocast failed (exit $rc; not fatal; 3: zero1 only)")
fi

echo
echo "== 5. tables"
for md in "$OUTDIR/gpu_memory.md" "$OUTDIR/gpu_check.md" "$OUTDIR/gpu_check_autocast.md"; do
    if [[ -f "$md" ]]; then
        echo "--- $md"
        cat "$md"
        echo
    fi
done
grep -h "rounds beside the next call's compute" "$OUTDIR/gpu_tests.log" 2>/dev/null | head -3 || true

echo "== done in ${SECONDS} s; outputs in $OUTDIR"
if ((${#warnings[@]})); then
    printf 'WARNING: %s\n' "${warnings[@]}" >&2
fi
if ((${#failed[@]})); then
    printf 'FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "all steps passed"
