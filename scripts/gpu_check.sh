#!/usr/bin/env bash
# GPU verification of bdfast on a lent machine (no internet): build, bdfast selftest, GPU tests,
# compute-sanitizer memcheck and racecheck over every kernel, then the benchmarks. Fits in 10 minutes on an H100.
#
#   OUT=/some/dir bash scripts/gpu_check.sh        # $OUT defaults to ./gpu-check
#
# Writes to $OUT (at most 8 files, so that all of them come back from the device tool):
#   summary.txt   device, versions, and one line per step: exit status and seconds
#   build.log  pytest_gpu.log  memcheck.log  racecheck.log  bench.log
#   ${GPU_TAG:-h100}.json   pytest-benchmark results
# Exits non-zero if any step failed; every step runs regardless, each under a time limit taken
# from what is left of BUDGET seconds (default 570).
set -uo pipefail

cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-570}
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
CUDA_BIN=${CUDA_HOME:-/usr/local/cuda}/bin
SANITIZER=$(command -v compute-sanitizer || echo "$CUDA_BIN/compute-sanitizer")
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
failed=0

{
  echo "# bdfast GPU check, $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch',
             torch.__version__, '| cuda', torch.version.cuda)" 2>&1
  "$CUDA_BIN/nvcc" --version 2>&1 | tail -1
} > "$SUMMARY"

# step NAME CAP_SECONDS COMMAND...: runs COMMAND into $OUT/NAME.log under min(CAP, time left).
step() {
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  local limit=$((cap < left ? cap : left))
  if ((limit <= 5)); then
    echo "$name: skipped, out of time" | tee -a "$SUMMARY"
    failed=1
    return
  fi
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $(($(date +%s) - t0)) s (limit $limit s)" | tee -a "$SUMMARY"
  ((rc == 0)) || failed=1
}

# The build compiles the default arch list (sm_80, sm_90 + PTX), as CI does.
step build 240 "$PY" -m pip install --no-build-isolation --no-deps -v -e .
step backends 60 "$PY" -c "
import bdfast, torch
info = bdfast.backend_info()
print(info)
assert info['native_cuda'] and info['cuda_device'], info['why']
"
cat "$OUT/backends.log" >> "$SUMMARY" && rm -f "$OUT/backends.log"
step selftest 60 "$PY" -m bdfast selftest
cat "$OUT/selftest.log" >> "$SUMMARY" && rm -f "$OUT/selftest.log"
step pytest_gpu 200 "$PY" -m pytest tests -m gpu -q -p no:cacheprovider
for tool in memcheck racecheck; do
  # Only bdfast's kernels are instrumented (kns: kernel-name substring), which keeps the run
  # short; API errors are left to the extension's own checks (torch probes some on purpose).
  step "$tool" 120 "$SANITIZER" --tool "$tool" --kernel-name kns=bdfast --report-api-errors no \
    --error-exitcode 1 "$PY" tests/support/sanitize_ops.py
done
step bench 400 "$PY" -m pytest benchmarks --benchmark-only -q -p no:cacheprovider \
  --benchmark-json="$OUT/${GPU_TAG:-h100}.json"

verdict=$([ $failed = 0 ] && echo "all steps passed" || echo "SOME STEPS FAILED")
echo "total: $(($(date +%s) - START)) s, $verdict" | tee -a "$SUMMARY"
exit $failed
