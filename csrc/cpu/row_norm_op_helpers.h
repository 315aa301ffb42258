// Tensor-level helpers shared by the LayerNorm and RMSNorm CPU ops: the
// affine parameters and gradient scratch in the shape the row kernels take
// (row_norm_kernels.h).
#pragma once

#include "../row_norm_checks.h"
#include "row_norm_kernels.h"

#include <ATen/ATen.h>

#include <optional>

namespace layernorm_ext::cpu {

// A weight or bias as `cols` contiguous acc_type values: the tensor itself
// when it already is, a converted copy otherwise, and `fill` (1 for a weight,
// 0 for a bias, exact no-ops) when the op has none.
inline at::Tensor param_as_acc(
    const std::optional<at::Tensor>& param, int64_t cols, at::ScalarType acc_type, double fill) {
  if (param.has_value()) return param->to(acc_type).contiguous();
  return at::full({cols}, fill, at::TensorOptions().dtype(acc_type));
}

// A row kernel's contiguous output `t` laid out in `format`: `t` itself for
// Contiguous, else a copy with the strides at::empty gives for `format`,
// which the fake kernels give.
inline at::Tensor in_memory_format(const at::Tensor& t, at::MemoryFormat format) {
  if (format == at::MemoryFormat::Contiguous) return t;
  auto relaid = at::empty(t.sizes(), t.options().memory_format(format));
  relaid.copy_(t);
  return relaid;
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

} // namespace layernorm_ext::cpu
