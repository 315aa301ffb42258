// The BatchNorm kernels of batch_norm_kernels_impl.h compiled for AVX2 with FMA and F16C.
// Everything this file includes comes before the target pragma, so only
// code defined here (in namespace avx2) is built for avx2.
#include "batch_norm_kernels.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#if LAYERNORM_EXT_X86_SIMD
#include <immintrin.h>

#pragma GCC push_options
// No FP contraction: the kernels ask for FMAs where they want them, so that
// the compiler's choices cannot change a result's bits.
#pragma GCC optimize("fp-contract=off")
#pragma GCC target("avx2,fma,f16c")

namespace layernorm_ext::cpu::avx2 {
#include "simd_vec_avx2.h"
#include "simd_kernel_helpers.h"
#include "batch_norm_kernels_impl.h"
} // namespace layernorm_ext::cpu::avx2

#pragma GCC pop_options
#endif
