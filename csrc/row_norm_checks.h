// Argument checks shared by the LayerNorm and RMSNorm ops of every backend.
// They raise the errors torch.nn.functional raises, with the same wording
// where torch has one, before any output is allocated.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace layernorm_ext {

// A normalized input seen as a matrix: `rows` independent rows of `cols`
// contiguous elements (the product of normalized_shape).
struct RowShape {
  int64_t rows;
  int64_t cols;
};

// Checks input, normalized_shape and the optional affine parameters of a
// row-wise norm and returns its matrix shape. `op` names the caller in
// messages. Parameters must have normalized_shape, share the input's device,
// and have the input's dtype (or float32 for a float16/bfloat16 input).
RowShape check_row_norm_args(
    const char* op,
    const at::Tensor& input,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias);

// Checks the residual of a fused residual-add op: the input's shape, dtype
// and device.
void check_residual(const char* op, const at::Tensor& input, const at::Tensor& residual);

// Checks a backward op's tensors against the forward input: grad_output of
// the input's shape and dtype, statistics with one entry per row.
void check_row_norm_backward_args(
    const char* op,
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const RowShape& shape,
    std::initializer_list<const at::Tensor*> stats);

// The shape of per-row statistics: the input's leading (batch) dims.
std::vector<int64_t> stats_shape(const at::Tensor& input, at::IntArrayRef normalized_shape);

// The memory format of rms_norm_forward's output, from the input, and of
// rms_norm_backward's grad_input, from grad_output: torch's rms_norm keeps a
// channels_last or channels_last_3d layout (Tensor::suggest_memory_format)
// and makes anything else contiguous. The fake kernels apply the same rule
// (torch._prims_common.suggest_memory_format). LayerNorm's outputs are
// contiguous, as torch's are.
at::MemoryFormat rms_norm_memory_format(const at::Tensor& t);

// Accumulation dtype of an input dtype: float64 stays float64, the rest float32.
at::ScalarType accumulate_type(at::ScalarType input_dtype);

} // namespace layernorm_ext
