#!/usr/bin/env bash
# CI's CUDA job, on a machine with nvcc and no GPU: builds the whole extension
# with its CUDA kernels against pip's CUDA torch, in a venv of its own, and checks
#  1. build_info()["cuda"]: the installed _C has the CUDA kernels;
#  2. every op of the layernorm_ext namespace has a CUDA kernel registered;
#  3. ptxas's register spills, reported (tools/check_cuda_kernels.sh; a failure
#     with FAIL_ON_SPILLS=1, once the kernels have none);
#  4. the test suite passes under that torch (the CPU tests; the CUDA ones need
#     a GPU), tests/test_cmake.py included: the CMake build with the CUDA torch
#     builds its CUDA kernels and passes ctest.
# Every check runs; the job fails at the end if any failed, naming them.
#
# The venv (torch with its nvidia wheels, about 3 GB) is kept outside the clone,
# in $LAYERNORM_EXT_CACHE (default ~/.cache/layernorm_ext), one per torch
# version and Python, and reused by later runs on the same machine; a fresh
# machine builds it (about 2 minutes from the local mirror).
# Usage: tools/ci_cuda_build.sh   (CUDA_TORCH=2.14.1 picks the torch release)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"

CUDA_TORCH="${CUDA_TORCH:-2.14.1}"
CACHE="${LAYERNORM_EXT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/layernorm_ext}"
PY_TAG="$(python3 -c 'import sys; print(f"py{sys.version_info[0]}{sys.version_info[1]}")')"
VENV="$CACHE/venv-torch-$CUDA_TORCH-$PY_TAG"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
# Builds with 2 jobs (CI has 2 cores); the defaults of a new user otherwise:
# no TORCH_CUDA_ARCH_LIST, no CUDA_HOME (nvcc on PATH may be a wrapper).
export MAX_JOBS="${MAX_JOBS:-2}"
unset CUDA_HOME CUDA_PATH TORCH_CUDA_ARCH_LIST LAYERNORM_EXT_CUDA LAYERNORM_EXT_JIT

step() { echo; echo "=== ci_cuda_build: $1 ($(date +%T))"; }
seconds_since() { echo $(( $(date +%s) - $1 )); }

# A venv is complete once its marker exists: an install cut short is redone.
if [[ ! -f "$VENV/.complete" ]]; then
  step "creating $VENV (torch==$CUDA_TORCH)"
  start=$(date +%s)
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "torch==$CUDA_TORCH"
  "$VENV/bin/pip" install -q -r requirements-test.txt
  touch "$VENV/.complete"
  echo "venv installed in $(seconds_since "$start") s"
else
  step "reusing $VENV"
fi
"$VENV/bin/python" -c 'import torch; assert torch.version.cuda, torch.__version__; print("torch", torch.__version__)'

failed=()

step "pip install --no-build-isolation . (CUDA build, MAX_JOBS=$MAX_JOBS)"
start=$(date +%s)
"$VENV/bin/pip" install -v --no-build-isolation . > /tmp/layernorm_ext_cuda_build.log 2>&1 \
  || { tail -60 /tmp/layernorm_ext_cuda_build.log; echo "FAIL the CUDA build" >&2; exit 1; }
grep 'layernorm_ext:' /tmp/layernorm_ext_cuda_build.log | sort -u
echo "built in $(seconds_since "$start") s"

step "build_info and the CUDA kernels of every op"
# In /tmp: the installed package, not the source tree.
(cd /tmp && "$VENV/bin/python" - <<'PY') || failed+=("CUDA kernels")
import sys
import torch
import layernorm_ext

info = layernorm_ext.build_info()
print("build_info:", info)
ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("layernorm_ext::"))
missing = [n for n in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")]
print(f"{len(ops) - len(missing)} of {len(ops)} ops have a CUDA kernel")
for name in missing:
    print(f"FAIL no CUDA kernel registered for {name}")
if info["source"] != "prebuilt" or not info["cuda"]:
    print("FAIL the installed extension is not the prebuilt one with CUDA kernels")
sys.exit(bool(missing) or info["source"] != "prebuilt" or not info["cuda"])
PY

step "ptxas register spills (reported; FAIL_ON_SPILLS=1 makes them fail)"
FAIL_ON_SPILLS="${FAIL_ON_SPILLS:-0}" PYTHON="$VENV/bin/python" JOBS="$MAX_JOBS" bash tools/check_cuda_kernels.sh \
  || failed+=("register spills")

step "the test suite under torch $CUDA_TORCH (no GPU)"
start=$(date +%s)
# The suite builds the CUDA kernels twice more (tests/test_package.py's JIT
# build, tests/test_cmake.py's CMake build): for one architecture, which halves
# their time; the pip build above used the default list.
# The CPU executor's tests (-m cuda_emulated) build against the host torch in
# the main job and test the kernels, not torch: they run there only.
TORCH_CUDA_ARCH_LIST=9.0 "$VENV/bin/pytest" tests -ra -m "not cuda_emulated" || failed+=("tests")
echo "tests ran in $(seconds_since "$start") s"

if (( ${#failed[@]} )); then
  echo "ci_cuda_build: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "ci_cuda_build: all checks passed"
