// The row kernels of row_norm_kernels_impl.h compiled for AVX-512 (F, BW, VL) with FMA and F16C.
// Everything this file includes comes before the target pragma, so only
// code defined here (in namespace avx512) is built for avx512.
#include "row_norm_kernels.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#if LAYERNORM_EXT_X86_SIMD
#include <immintrin.h>

#pragma GCC push_options
// No FP contraction: a * b - c must round a * b as the same product rounds
// elsewhere (a one-element row's input gradient cancels to exactly 0); the
// kernels ask for FMAs where they want them.
#pragma GCC optimize("fp-contract=off")
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")

namespace layernorm_ext::cpu::avx512 {
#include "simd_vec_avx512.h"
#include "simd_kernel_helpers.h"
#include "row_norm_kernels_impl.h"
} // namespace layernorm_ext::cpu::avx512

#pragma GCC pop_options
#endif
