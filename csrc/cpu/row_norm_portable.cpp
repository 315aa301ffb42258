// The row kernels of row_norm_kernels_impl.h compiled for plain C++ (any CPU), the fallback when neither AVX2 nor AVX-512 is there.
#include "row_norm_kernels.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

// No FP contraction (see row_norm_avx512.cpp), whatever -march the build uses.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace layernorm_ext::cpu::portable {
#include "simd_vec_portable.h"
#include "simd_kernel_helpers.h"
#include "row_norm_kernels_impl.h"
} // namespace layernorm_ext::cpu::portable
