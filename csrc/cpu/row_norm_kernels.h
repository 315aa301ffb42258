// Row-wise normalization kernels on the CPU, shared by LayerNorm
// (kCenter = true: subtract the row mean) and RMSNorm (kCenter = false), and
// by their fused residual-add forms (the row is input + residual).
//
// The input is a matrix of `rows` x `cols` contiguous elements; each row is
// normalized on its own: y = (x - mean) * rstd * weight + bias, with
// rstd = 1 / sqrt(mean((x - mean)^2) + eps) (RMSNorm: mean = 0, bias = 0).
//
// This header is the interface: the argument blocks, the shape-only work
// split shared by every build of the kernels, and row_norm_forward /
// row_norm_backward, which call the kernels compiled for the SIMD level in use
// (simd_level.h). The kernels themselves are in row_norm_kernels_impl.h.
#pragma once

#include "../op_arguments.h"
#include "simd_level.h"
#include "simd_targets.h"

#include <algorithm>
#include <cstdint>

namespace layernorm_ext::cpu {

// Smallest piece of work (in elements) worth handing to a thread.
constexpr int64_t kGrainElements = 1 << 15;
// Bounds on the partial rows of the weight/bias gradients. The partials are
// a temporary written and read once per backward: at 4 MiB they stay a small
// share of its traffic and below the sizes glibc maps fresh for every call
// (at 32 MiB, LayerNorm float32 8192x4096 forward+backward paid 8,193 page
// faults and 64 MiB of traffic for them: 235 ms, against 189 ms now). The
// longer chains this leaves in the largest shapes (16 adds at 8192x4096)
// keep their gradients 10x closer to float64 than torch's.
constexpr int64_t kMaxGradBlocks = 1024;
constexpr int64_t kMaxGradPartialBytes = int64_t{4} << 20;

inline int64_t grain_rows(int64_t cols) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(cols, 1));
}

// Tasks worth running for rows x cols elements (kGrainElements each).
inline int64_t grad_tasks(int64_t rows, int64_t cols) {
  return std::max<int64_t>(1, rows * std::max<int64_t>(cols, 1) / kGrainElements);
}

// Number of row blocks for the weight/bias gradient partials: a function of
// the shape alone (never of the thread count), so the summation order is fixed.
// A column's gradient is a chain of rounded adds, one per row group of
// kRowGroup (row_norm_kernels_impl.h), within a block; the blocks are added
// in double. Blocks of kGradChainRows rows (within the bounds) keep that
// chain at 4 adds, which the float64 sum of the blocks does not lengthen;
// where the work alone would take one task (grad_tasks), a task takes several
// blocks.
constexpr int64_t kGradChainRows = 16;

inline int64_t grad_blocks(int64_t rows, int64_t cols, int64_t acc_bytes_per_col) {
  if (rows == 0) return 0;
  const int64_t by_accuracy = (rows + kGradChainRows - 1) / kGradChainRows;
  const int64_t by_memory =
      std::max<int64_t>(1, kMaxGradPartialBytes / std::max<int64_t>(1, cols * acc_bytes_per_col));
  return std::min({rows, std::max(grad_tasks(rows, cols), by_accuracy), by_memory, kMaxGradBlocks});
}

template <typename T>
struct RowNormForwardArgs {
  const T* input;
  const T* residual;  // fused add: the row is input + residual; else null
  const acc_t<T>* weight;  // cols values (ones when the op has no weight)
  const acc_t<T>* bias;  // cols values (zeros when the op has no bias)
  T* output;
  T* sum;  // fused add: receives input + residual; else null
  acc_t<T>* mean;  // unused when !kCenter
  acc_t<T>* rstd;
  int64_t rows;
  int64_t cols;
  double eps;
};

template <typename T>
struct RowNormBackwardArgs {
  const T* grad_output;
  const T* input;
  const acc_t<T>* mean;  // unused when !kCenter
  const acc_t<T>* rstd;
  const acc_t<T>* weight;  // cols values (ones when the op has no weight)
  T* grad_input;  // each of the three gradients is null when not asked for
  acc_t<T>* grad_weight;
  acc_t<T>* grad_bias;
  // When grad_weight or grad_bias is asked for: scratch of
  // grad_blocks(rows, cols, partial_rows * sizeof(acc)) * partial_rows * cols
  // values, partial_rows being how many of the two are asked for.
  acc_t<T>* partials;
  int64_t rows;
  int64_t cols;
};

// One declaration per compiled instruction set; the definitions (explicit
// instantiations for float, double, Half and BFloat16) are in
// kernels_<isa>.cpp.
#define LAYERNORM_EXT_DECLARE_ROW_NORM_KERNELS(isa)               \
  namespace isa {                                                  \
  template <bool kCenter, typename T>                              \
  void row_norm_forward(const RowNormForwardArgs<T>& args);        \
  template <bool kCenter, typename T>                              \
  void row_norm_backward(const RowNormBackwardArgs<T>& args);      \
  }
LAYERNORM_EXT_DECLARE_ROW_NORM_KERNELS(portable)
#if LAYERNORM_EXT_X86_SIMD
LAYERNORM_EXT_DECLARE_ROW_NORM_KERNELS(avx2)
LAYERNORM_EXT_DECLARE_ROW_NORM_KERNELS(avx512)
#endif
#undef LAYERNORM_EXT_DECLARE_ROW_NORM_KERNELS

template <bool kCenter, typename T>
void row_norm_forward(const RowNormForwardArgs<T>& args) {
  switch (active_simd_level()) {
#if LAYERNORM_EXT_X86_SIMD
    case SimdLevel::kAvx512:
      return avx512::row_norm_forward<kCenter>(args);
    case SimdLevel::kAvx2:
      return avx2::row_norm_forward<kCenter>(args);
#endif
    default:
      return portable::row_norm_forward<kCenter>(args);
  }
}

template <bool kCenter, typename T>
void row_norm_backward(const RowNormBackwardArgs<T>& args) {
  switch (active_simd_level()) {
#if LAYERNORM_EXT_X86_SIMD
    case SimdLevel::kAvx512:
      return avx512::row_norm_backward<kCenter>(args);
    case SimdLevel::kAvx2:
      return avx2::row_norm_backward<kCenter>(args);
#endif
    default:
      return portable::row_norm_backward<kCenter>(args);
  }
}

} // namespace layernorm_ext::cpu
