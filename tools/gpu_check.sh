#!/usr/bin/env bash
# The GPU check, for one lent H100/H200 (python3 with a CUDA torch, nvcc, 16
# cores, no internet), in the repository root, within 9 minutes:
#   1. build:  MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 pip install --no-build-isolation .
#   2. tests:  the CUDA tests (tests/test_cuda.py) and python -m layernorm_ext
#   3. memcheck, 4. racecheck: compute-sanitizer over a small subset (the
#      self-check of every op, forward and backward, on CPU and CUDA)
#   5. bench:  benchmarks/bench_gpu.py --quick against torch eager, torch.compile
#      and Liger-Kernel (carried as a wheel in .whl/: run with carry [".whl"])
# Each phase has a time limit (seconds: BUILD_S, TESTS_S, SANITIZER_S, BENCH_S)
# so that the whole check ends in time; a phase that fails or runs out goes on
# to the next and is named at the end (exit 1). Logs, the benchmark table and
# plot go to $OUT (default ./gpu_check_out).
#
# --dry-run rehearses every phase on a machine without a GPU: the same build
# (a CUDA torch builds the CUDA kernels for 9.0 there too; pass MAX_JOBS), the
# tests collected rather than run, compute-sanitizer's presence checked,
# bench_gpu.py --dry-run. It installs into $PYTHON, which must then be a venv.
# Usage: tools/gpu_check.sh [--dry-run]   (PYTHON=python to install into)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
export MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" PYTHONUNBUFFERED=1
BUILD_S="${BUILD_S:-240}" TESTS_S="${TESTS_S:-90}" SANITIZER_S="${SANITIZER_S:-60}" BENCH_S="${BENCH_S:-120}"

if (( DRY_RUN )) && [[ "$("$PYTHON" -c 'import sys; print(sys.prefix != sys.base_prefix)')" != True ]]; then
  echo "gpu_check: --dry-run installs the package: point PYTHON at a venv's python" >&2
  exit 2
fi

failed=()
# phase NAME LIMIT COMMAND...: runs COMMAND with its output in $OUT/NAME.log.
phase() {
  local name="$1" limit="$2" start status
  shift 2
  echo "=== gpu_check: $name (limit ${limit}s, $(date +%T))"
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  status=$?
  tail -15 "$OUT/$name.log"
  echo "=== gpu_check: $name: exit $status after $(( $(date +%s) - start ))s"
  (( status == 0 )) || failed+=("$name (exit $status)")
}

{
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  nvcc --version | tail -1
} | tee "$OUT/machine.txt"

# Carried wheels (Liger-Kernel), without their dependencies (torch and triton are there).
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_check_site .whl/*.whl \
    && export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
fi

phase build "$BUILD_S" "$PYTHON" -m pip install -v --no-build-isolation .
# Everything below runs outside the source tree, against the installed build.
cd /tmp
ROOT="$OLDPWD"
if (( DRY_RUN )); then
  phase tests "$TESTS_S" "$PYTHON" -m pytest "$ROOT/tests/test_cuda.py" --collect-only -q
  phase sanitizer "$SANITIZER_S" bash -c 'command -v compute-sanitizer || { echo "compute-sanitizer not on PATH (on the GPU machine it is)"; exit 0; }'
  phase bench "$BENCH_S" "$PYTHON" "$ROOT/benchmarks/bench_gpu.py" --dry-run --out "$OUT"
else
  phase tests "$TESTS_S" bash -c "'$PYTHON' -m pytest '$ROOT/tests/test_cuda.py' -ra -q -p no:cacheprovider && '$PYTHON' -m layernorm_ext --no-speed"
  for tool in memcheck racecheck; do
    phase "$tool" "$SANITIZER_S" compute-sanitizer --tool "$tool" --error-exitcode 1 \
      "$PYTHON" -m layernorm_ext --no-speed
  done
  phase bench "$BENCH_S" "$PYTHON" "$ROOT/benchmarks/bench_gpu.py" --quick --out "$OUT"
fi

if (( ${#failed[@]} )); then
  echo "gpu_check: FAILED: ${failed[*]} (logs in $OUT)"
  exit 1
fi
echo "gpu_check: every phase passed (logs in $OUT)"
