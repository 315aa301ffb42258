#!/usr/bin/env bash
# Compiles every CUDA source of the extension without a GPU, so that CI
# catches kernel build breaks on machines that have nvcc but no device:
#  - csrc/cuda/*.cu with nvcc for sm_80 and sm_90, every nvcc warning an
#    error and the host compiler at -Wall -Werror, on the defines torch's
#    extension builder passes (no implicit half/bfloat16 conversions);
#  - csrc/cuda/*_cuda.cpp (the torch glue) with the host compiler against
#    torch's headers and the CUDA toolkit's, when the installed torch ships its
#    CUDA headers (the CPU wheels do); skipped with a message otherwise. The
#    CPU wheels lack one generated header (c10/cuda/impl/cuda_cmake_macros.h),
#    which C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips; torch's headers are system
#    headers here (their own warnings are not ours);
#  - then every layernorm_ext::cuda function the glue calls must be defined
#    by the kernel objects (the explicit instantiations match the calls);
#  - last, ptxas's register spills: every kernel instantiation that spills to
#    local memory, per architecture (a failure with FAIL_ON_SPILLS=1).
# Both compile in the C++ standard the installed torch's headers require (C++20
# from torch 2.14; C++17 before, or without torch), as torch's builder does.
# Objects go to a temporary folder that is removed on exit. Sources compile
# in parallel (JOBS, default: the number of cores).
# Usage: tools/check_cuda_kernels.sh   (NVCC=/path/to/nvcc to pick a compiler)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$NVCC" ]]; then
  echo "check_cuda_kernels: nvcc not found (set NVCC or put it on PATH)" >&2
  exit 2
fi
JOBS="${JOBS:-$(nproc)}"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

# The toolkit root as nvcc reports it (nvcc may be a wrapper script elsewhere).
CUDA_TOP="$("$NVCC" --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)"
CUDA_INCLUDE="$(cd "${CUDA_TOP:-$(dirname "$NVCC")/..}" && pwd)/include"
# torch's include flags and the C++ standard its headers require (ATen.h
# refuses older compilers with "#if __cplusplus < 202002L"); the include flags
# only when the installed torch ships its CUDA headers (the glue needs them).
TORCH_BUILD="$("${PYTHON:-python3}" - <<'PY' 2>/dev/null || true
import os, re, sysconfig
from torch.utils.cpp_extension import include_paths
paths = include_paths() + [sysconfig.get_paths()["include"]]
aten = open(os.path.join(include_paths()[0], "ATen", "ATen.h")).read()
level = re.search(r"__cplusplus < (\d{4})", aten)
print({"2020": 20}.get(level and level.group(1), 17))
if os.path.isfile(os.path.join(include_paths()[0], "c10", "cuda", "CUDAGuard.h")):
    print(" ".join("-isystem " + p for p in paths))
PY
)"
CXX_STANDARD="$(sed -n 1p <<<"$TORCH_BUILD")"
CXX_STANDARD="${CXX_STANDARD:-17}"
TORCH_INCLUDES="$(sed -n 2p <<<"$TORCH_BUILD")"
export NVCC OUT CUDA_INCLUDE ROOT CXX_STANDARD

# ptxas's resource report of each source goes to $OUT/<source>.ptxas.
compile_cu() {
  local src="$1"
  "$NVCC" -c "$src" -o "$OUT/$(basename "$src").o" \
    -std=c++$CXX_STANDARD -O3 -lineinfo --resource-usage \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
    -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
    --expt-relaxed-constexpr \
    -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror,-fPIC \
    2> "$OUT/$(basename "$src").ptxas" \
    && echo "ok   $src" || { grep -v '^ptxas info' "$OUT/$(basename "$src").ptxas" >&2; echo "FAIL $src" >&2; return 1; }
}
export -f compile_cu

shopt -s nullglob
CU=("$ROOT"/csrc/cuda/*.cu)
GLUE=("$ROOT"/csrc/cuda/*_cuda.cpp)
if [[ ${#CU[@]} == 0 ]]; then
  echo "check_cuda_kernels: no csrc/cuda/*.cu found under $ROOT" >&2
  exit 2
fi
echo "check_cuda_kernels: $("$NVCC" --version | tail -1) (${#CU[@]} .cu files, $JOBS jobs, C++$CXX_STANDARD)"
printf '%s\n' "${CU[@]}" | xargs -P "$JOBS" -I{} bash -c 'compile_cu "$1"' _ {}

# ptxas reports, per kernel and architecture, "Compiling entry function '<mangled>'
# for 'sm_NN'" and then "Function properties ... N bytes spill stores, M bytes
# spill loads".
report_spills() {
  local spills
  spills="$(cat "$OUT"/*.ptxas | awk '
    /Compiling entry function/ { match($0, /function .[^'"'"']*/); name = substr($0, RSTART + 10, RLENGTH - 10);
                                 match($0, /sm_[0-9a-z]+/); arch = substr($0, RSTART, RLENGTH) }
    /bytes spill stores/ { match($0, /[0-9]+ bytes spill stores/); stores = substr($0, RSTART, RLENGTH) + 0;
                           match($0, /[0-9]+ bytes spill loads/); loads = substr($0, RSTART, RLENGTH) + 0;
                           if (name != "" && (stores > 0 || loads > 0)) print arch, stores, loads, name; name = "" }' \
    | c++filt | sort -u | sort -k1,1 -k2,2nr)"
  if [[ -z "$spills" ]]; then
    echo "check_cuda_kernels: no kernel spills registers (ptxas)"
    return 0
  fi
  echo "check_cuda_kernels: $(wc -l <<<"$spills") kernel instantiations spill registers to local memory (ptxas):"
  awk '{ arch = $1; stores = $2; loads = $3; $1 = $2 = $3 = ""; sub(/^ +/, ""); printf "  %s  %3d B stores %3d B loads  %s\n", arch, stores, loads, $0 }' <<<"$spills"
  [[ "${FAIL_ON_SPILLS:-0}" != 1 ]] || { echo "FAIL register spills (FAIL_ON_SPILLS=1)" >&2; return 1; }
}

if [[ ${#GLUE[@]} == 0 ]]; then
  echo "check_cuda_kernels: all sources compiled (no host glue found)"
  report_spills
  exit
fi
if [[ -z "$TORCH_INCLUDES" ]]; then
  echo "check_cuda_kernels: torch's CUDA headers not found; host glue (csrc/cuda/*_cuda.cpp) not compiled"
  report_spills
  exit
fi
compile_glue() {
  local src="$1"
  ${CXX:-c++} -c "$src" -o "$OUT/$(basename "$src").glue.o" -std=c++$CXX_STANDARD -O1 -fPIC \
    -Wall -Wextra -Werror -DLAYERNORM_EXT_WITH_CUDA -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE \
    $TORCH_INCLUDES -isystem "$CUDA_INCLUDE" \
    && echo "ok   $src" || { echo "FAIL $src" >&2; return 1; }
}
export -f compile_glue
export TORCH_INCLUDES
printf '%s\n' "${GLUE[@]}" | xargs -P "$JOBS" -I{} bash -c 'compile_glue "$1"' _ {}

defined="$(nm -C --defined-only "$OUT"/*.cu.o | grep -o 'layernorm_ext::cuda::.*' | sort -u)"
missing=0
while read -r sym; do
  if ! grep -qxF "$sym" <<<"$defined"; then
    echo "FAIL the glue calls $sym, which no kernel object defines" >&2
    missing=1
  fi
done < <(nm -C --undefined-only "$OUT"/*.glue.o | grep -o 'layernorm_ext::cuda::.*' | sort -u)
[[ "$missing" == 0 ]] || exit 1
echo "check_cuda_kernels: all sources compiled"
report_spills
