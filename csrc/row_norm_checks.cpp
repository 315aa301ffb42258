#include "row_norm_checks.h"

#include <c10/util/Exception.h>

namespace layernorm_ext {
namespace {

bool is_reduced_float(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16;
}

void check_param(
    const char* op,
    const char* name,
    const at::Tensor& param,
    const at::Tensor& input,
    at::IntArrayRef normalized_shape) {
  TORCH_CHECK(
      param.sizes() == normalized_shape,
      op, ": Expected ", name, " to be of same shape as normalized_shape, but got ",
      name, " of shape ", param.sizes(), " and normalized_shape = ", normalized_shape);
  TORCH_CHECK(
      param.device() == input.device(),
      op, ": expected ", name, " on the input's device ", input.device(),
      ", but got ", name, " on ", param.device());
  const bool same = param.scalar_type() == input.scalar_type();
  const bool mixed = is_reduced_float(input.scalar_type()) && param.scalar_type() == at::kFloat;
  TORCH_CHECK(
      same || mixed,
      op, ": expected ", name, " of dtype ", input.scalar_type(),
      (is_reduced_float(input.scalar_type()) ? " or Float" : ""),
      " (the input's dtype), but got ", name, " of dtype ", param.scalar_type());
}

} // namespace

void check_residual(const char* op, const at::Tensor& input, const at::Tensor& residual) {
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

at::ScalarType accumulate_type(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

at::MemoryFormat rms_norm_memory_format(const at::Tensor& t) {
  return t.suggest_memory_format();
}

std::vector<int64_t> stats_shape(const at::Tensor& input, at::IntArrayRef normalized_shape) {
  const auto batch_dims = input.dim() - static_cast<int64_t>(normalized_shape.size());
  return std::vector<int64_t>(input.sizes().begin(), input.sizes().begin() + batch_dims);
}

RowShape check_row_norm_args(
    const char* op,
    const at::Tensor& input,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias) {
  // torch raises NotImplementedError for integer inputs.
  TORCH_CHECK_NOT_IMPLEMENTED(
      at::isFloatingType(input.scalar_type()),
      "\"", op, "\" not implemented for '", c10::toString(input.scalar_type()),
      "': expected a floating-point input (Float, Double, Half or BFloat16)");
  TORCH_CHECK(
      !normalized_shape.empty(),
      op, ": Expected normalized_shape to be at least 1-dimensional, i.e., containing at "
      "least one element, but got normalized_shape = ", normalized_shape);
  const auto ndim = static_cast<int64_t>(normalized_shape.size());
  const bool trailing_match = input.dim() >= ndim &&
      input.sizes().slice(input.dim() - ndim) == normalized_shape;
  TORCH_CHECK(
      trailing_match,
      op, ": Given normalized_shape=", normalized_shape, ", expected input with shape [*",
      [&] {
        std::string dims;
        for (auto d : normalized_shape) dims += ", " + std::to_string(d);
        return dims;
      }(),
      "], but got input of size", input.sizes());
  if (weight.has_value()) check_param(op, "weight", *weight, input, normalized_shape);
  if (bias.has_value()) check_param(op, "bias", *bias, input, normalized_shape);
  TORCH_CHECK(
      !(weight.has_value() && bias.has_value()) ||
          weight->scalar_type() == bias->scalar_type(),
      op, ": expected weight and bias of one dtype, but got weight of dtype ",
      weight->scalar_type(), " and bias of dtype ", bias->scalar_type());

  int64_t cols = 1;
  for (auto d : normalized_shape) cols *= d;
  int64_t rows = 1;
  for (auto d : stats_shape(input, normalized_shape)) rows *= d;
  return {rows, cols};
}

void check_row_norm_backward_args(
    const char* op,
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const RowShape& shape,
    std::initializer_list<const at::Tensor*> stats) {
  TORCH_CHECK(
      grad_output.sizes() == input.sizes(),
      op, ": expected grad_output of the input's shape ", input.sizes(),
      ", but got grad_output of shape ", grad_output.sizes());
  TORCH_CHECK(
      grad_output.scalar_type() == input.scalar_type(),
      op, ": expected grad_output of the input's dtype ", input.scalar_type(),
      ", but got grad_output of dtype ", grad_output.scalar_type());
  TORCH_CHECK(
      grad_output.device() == input.device(),
      op, ": expected grad_output on the input's device ", input.device(),
      ", but got grad_output on ", grad_output.device());
  const auto acc = accumulate_type(input.scalar_type());
  for (const at::Tensor* s : stats) {
    TORCH_CHECK(
        s->numel() == shape.rows && s->scalar_type() == acc && s->device() == input.device(),
        op, ": expected saved statistics of ", shape.rows, " elements of dtype ", acc,
        " on ", input.device(), ", but got ", s->numel(), " elements of dtype ",
        s->scalar_type(), " on ", s->device());
  }
}

} // namespace layernorm_ext
