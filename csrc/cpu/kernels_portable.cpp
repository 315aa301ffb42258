// The CPU kernels (row norms and BatchNorm) compiled for plain C++ (any CPU),
// in namespace portable: the fallback when neither AVX2 nor AVX-512 is there.
#include "simd_kernels_prelude.h"

// No FP contraction (see kernels_avx512.cpp), whatever -march the build uses.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace layernorm_ext::cpu::portable {
#include "simd_vec_portable.h"
#include "simd_kernel_helpers.h"
#include "row_norm_kernels_impl.h"
#include "batch_norm_kernels_impl.h"
} // namespace layernorm_ext::cpu::portable
