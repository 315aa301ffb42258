// The CPU kernels (row norms and BatchNorm) compiled for AVX2 with FMA and
// F16C, in namespace avx2.
#include "simd_kernels_prelude.h"

#if LAYERNORM_EXT_X86_SIMD
#pragma GCC push_options
// No FP contraction (see kernels_avx512.cpp).
#pragma GCC optimize("fp-contract=off")
#pragma GCC target("avx2,fma,f16c")

namespace layernorm_ext::cpu::avx2 {
#include "simd_vec_avx2.h"
#include "simd_kernel_helpers.h"
#include "row_norm_kernels_impl.h"
#include "batch_norm_kernels_impl.h"
} // namespace layernorm_ext::cpu::avx2

#pragma GCC pop_options
#endif
