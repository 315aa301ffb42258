// Tensor-level helpers shared by the LayerNorm and RMSNorm CPU ops: the
// affine parameters and gradient scratch in the shape the row kernels take
// (row_norm_kernels.h), and the fused residual-add argument check.
#pragma once

#include "../row_norm_checks.h"
#include "row_norm_kernels.h"

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace layernorm_ext::cpu {

// Outputs of kHugePageOutputBytes or more are fresh memory mapped for this
// call: every 4 KiB page faults on its first write, which for a large output
// costs more than the kernel (about 3 us a page in a VM: 25 ms for 32 MiB
// against 1 ms of work). Asking for transparent huge pages before the first
// write (where the system allows it on request) makes that one fault per
// 2 MiB. torch offers the same for all its allocations behind
// THP_MEM_ALLOC_ENABLE=1; here it applies to these ops' outputs only.
constexpr int64_t kHugePageOutputBytes = int64_t{8} << 20;

inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  auto output = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const auto bytes = static_cast<int64_t>(output.nbytes());
  if (bytes >= kHugePageOutputBytes) {
    constexpr std::uintptr_t kHugePage = std::uintptr_t{2} << 20;
    const auto begin = reinterpret_cast<std::uintptr_t>(output.data_ptr());
    const auto first = (begin + kHugePage - 1) & ~(kHugePage - 1);
    const auto last = (begin + static_cast<std::uintptr_t>(bytes)) & ~(kHugePage - 1);
    // Advice only: where it is refused, the pages fault as before.
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return output;
}

// A weight or bias as `cols` contiguous acc_type values: the tensor itself
// when it already is, a converted copy otherwise, and `fill` (1 for a weight,
// 0 for a bias, exact no-ops) when the op has none.
inline at::Tensor param_as_acc(
    const std::optional<at::Tensor>& param, int64_t cols, at::ScalarType acc_type, double fill) {
  if (param.has_value()) return param->to(acc_type).contiguous();
  return at::full({cols}, fill, at::TensorOptions().dtype(acc_type));
}

// Scratch for the block partial rows of the weight/bias gradients (see
// RowNormBackwardArgs::partials).
inline at::Tensor grad_partials(const RowShape& shape, int64_t partial_rows, at::ScalarType acc_type) {
  const int64_t acc_bytes = static_cast<int64_t>(c10::elementSize(acc_type));
  const int64_t blocks = partial_rows > 0
      ? grad_blocks(shape.rows, shape.cols, partial_rows * acc_bytes)
      : 0;
  return at::empty({blocks * partial_rows * shape.cols}, at::TensorOptions().dtype(acc_type));
}

// The fused residual-add ops take input and residual of one shape, dtype and device.
inline void check_residual(const char* op, const at::Tensor& input, const at::Tensor& residual) {
  TORCH_CHECK(
      residual.sizes() == input.sizes(),
      op, ": expected residual of the input's shape ", input.sizes(),
      ", but got residual of shape ", residual.sizes());
  TORCH_CHECK(
      residual.scalar_type() == input.scalar_type(),
      op, ": expected residual of the input's dtype ", input.scalar_type(),
      ", but got residual of dtype ", residual.scalar_type());
  TORCH_CHECK(
      residual.device() == input.device(),
      op, ": expected residual on the input's device ", input.device(),
      ", but got residual on ", residual.device());
}

} // namespace layernorm_ext::cpu
