#!/usr/bin/env bash
# The one GPU check (H100/H200 machine: python3 with torch 2.11+cu130, triton 3.6, nvcc 13.0, no network).
# Builds nnopt._C offline for sm_90, runs the CUDA tests (optimizers: triton and cuda backends, fp32/bf16/fp16,
# >2^31 elements, no host sync under GradScaler; masked linear and 2:4; distillation loss), then the optimizer,
# masked-linear and distillation benchmarks, and prints a short table last.
#   bash bench/gpu_check.sh            (logs and RESULTS entries go under $OUT when set, else /tmp/nnopt_gpu)
set -uo pipefail
cd "$(dirname "$0")/.."
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 PYTHONUNBUFFERED=1
LOG=${OUT:-/tmp/nnopt_gpu}
mkdir -p "$LOG"
PY=python3
status=()

echo "== build"
if $PY -m pip install --no-build-isolation --no-deps -e . >"$LOG/build.log" 2>&1; then
  status+=("build: ok")
else
  tail -40 "$LOG/build.log"; status+=("build: FAILED (see build.log)")
fi
$PY -m nnopt info 2>&1 | tee "$LOG/info.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | tee -a "$LOG/info.txt"

echo "== GPU tests"
timeout 240 $PY -m pytest tests/kernels tests/optim tests/nn tests/transfer tests/prune -q -rs --durations=15 -k "cuda or gpu" \
  -p no:cacheprovider >"$LOG/tests.log" 2>&1
rc=$?
tail -25 "$LOG/tests.log"
status+=("gpu tests: rc=$rc, $(grep -E '[0-9]+ (passed|failed)' "$LOG/tests.log" | tail -1)")

echo "== benchmarks"
timeout 150 $PY bench/bench_optim.py --device cuda --repeats 10 >"$LOG/bench.log" 2>&1
status+=("bench optim: rc=$?")
timeout 90 $PY bench/bench_masked_linear.py --device cuda >"$LOG/bench_masked_linear.log" 2>&1
status+=("bench masked_linear: rc=$?")
timeout 90 $PY bench/bench_distill.py --device cuda >"$LOG/bench_distill.log" 2>&1
status+=("bench distill: rc=$?")
cp bench/RESULTS.md "$LOG/RESULTS.md" 2>/dev/null

echo
echo "================ summary ================"
printf '%s\n' "${status[@]}"
sed -n '/^summary/,$p' "$LOG/bench.log"
grep -E "^- (forward|fwd|bars)|bar .*x: (met|missed)" "$LOG/bench_masked_linear.log" | tail -8
grep -E "^\| (torch eager|nnopt)" "$LOG/bench_distill.log" | tail -4
