// Everything the kernel bodies (row_norm_kernels_impl.h,
// batch_norm_kernels_impl.h) use, included by each kernels_<isa>.cpp before
// its target pragma: only code those files define inside their ISA
// namespace is built for that ISA, never a library header's inline code.
#pragma once

#include "batch_norm_kernels.h"
#include "output_stores.h"
#include "row_norm_kernels.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#if LAYERNORM_EXT_X86_SIMD
#include <immintrin.h>
#endif
