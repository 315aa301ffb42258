// The CPU kernels (row norms and BatchNorm) compiled for AVX-512 (F, BW, VL)
// with FMA and F16C, in namespace avx512.
#include "simd_kernels_prelude.h"

#if LAYERNORM_EXT_X86_SIMD
#pragma GCC push_options
// No FP contraction: a * b - c must round a * b as the same product rounds
// elsewhere (a one-element row's input gradient cancels to exactly 0), and
// the compiler's choices must not change a result's bits; the kernels ask for
// FMAs where they want them.
#pragma GCC optimize("fp-contract=off")
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")

namespace layernorm_ext::cpu::avx512 {
#include "simd_vec_avx512.h"
#include "simd_kernel_helpers.h"
#include "row_norm_kernels_impl.h"
#include "batch_norm_kernels_impl.h"
} // namespace layernorm_ext::cpu::avx512

#pragma GCC pop_options
#endif
