// LayerNorm on the CPU, plain and with a fused residual add: argument checks,
// output allocation and dtype dispatch around the row kernels of
// row_norm_kernels.h.
#include "../row_norm_checks.h"
#include "row_norm_op_helpers.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace layernorm_ext::cpu {
namespace {

// output, input + residual (an undefined tensor without residual), mean, rstd.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_forward_impl(
    const char* op,
    const at::Tensor& input,
    const std::optional<at::Tensor>& residual,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    double eps) {
  const auto shape = check_row_norm_args(op, input, normalized_shape, weight, bias);
  if (residual) check_residual(op, input, *residual);
  const auto x = input.contiguous();
  const auto res = optional_contiguous(residual);
  const auto acc_type = accumulate_type(x.scalar_type());
  const auto w = param_as_acc(weight, shape.cols, acc_type, 1);
  const auto b = param_as_acc(bias, shape.cols, acc_type, 0);
  auto output = at::empty(input.sizes(), x.options());
  auto sum = residual ? at::empty(input.sizes(), x.options()) : at::Tensor();
  auto mean = at::empty(stats_shape(input, normalized_shape), x.options().dtype(acc_type));
  auto rstd = at::empty(stats_shape(input, normalized_shape), x.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_forward", [&] {
    using acc = acc_t<scalar_t>;
    row_norm_forward</*kCenter=*/true>(RowNormForwardArgs<scalar_t>{
        x.const_data_ptr<scalar_t>(), res ? res->const_data_ptr<scalar_t>() : nullptr,
        w.const_data_ptr<acc>(), b.const_data_ptr<acc>(), output.mutable_data_ptr<scalar_t>(),
        residual ? sum.mutable_data_ptr<scalar_t>() : nullptr, mean.mutable_data_ptr<acc>(),
        rstd.mutable_data_ptr<acc>(), shape.rows, shape.cols, eps});
  });
  return {output, sum, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward_cpu(
    const at::Tensor& input,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    double eps) {
  auto [output, sum, mean, rstd] = layer_norm_forward_impl(
      "layer_norm", input, std::nullopt, normalized_shape, weight, bias, eps);
  return {output, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_add_layer_norm_forward_cpu(
    const at::Tensor& input,
    const at::Tensor& residual,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    double eps) {
  return layer_norm_forward_impl(
      "fused_add_layer_norm", input, residual, normalized_shape, weight, bias, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward_cpu(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    at::IntArrayRef normalized_shape,
    const at::Tensor& mean,
    const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    std::array<bool, 3> output_mask) {
  const auto shape =
      check_row_norm_args("layer_norm_backward", input, normalized_shape, weight, bias);
  check_row_norm_backward_args("layer_norm_backward", grad_output, input, shape, {&mean, &rstd});
  const auto x = input.contiguous();
  const auto dy = grad_output.contiguous();
  const auto acc_type = accumulate_type(x.scalar_type());
  const auto acc_options = x.options().dtype(acc_type);
  const auto w = param_as_acc(weight, shape.cols, acc_type, 1);
  const bool want_weight = output_mask[1] && weight.has_value();
  const bool want_bias = output_mask[2] && bias.has_value();
  auto grad_input = at::empty(output_mask[0] ? input.sizes() : at::IntArrayRef{0}, x.options());
  auto grad_weight = at::empty(want_weight ? normalized_shape : at::IntArrayRef{0}, acc_options);
  auto grad_bias = at::empty(want_bias ? normalized_shape : at::IntArrayRef{0}, acc_options);
  auto partials = grad_partials(shape, int64_t{want_weight} + int64_t{want_bias}, acc_type);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_backward", [&] {
    using acc = acc_t<scalar_t>;
    row_norm_backward</*kCenter=*/true>(RowNormBackwardArgs<scalar_t>{
        dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
        mean.contiguous().const_data_ptr<acc>(), rstd.contiguous().const_data_ptr<acc>(),
        w.const_data_ptr<acc>(), output_mask[0] ? grad_input.mutable_data_ptr<scalar_t>() : nullptr,
        want_weight ? grad_weight.mutable_data_ptr<acc>() : nullptr,
        want_bias ? grad_bias.mutable_data_ptr<acc>() : nullptr, partials.mutable_data_ptr<acc>(),
        shape.rows, shape.cols});
  });
  // Gradients are summed in acc_t and returned in their parameter's dtype
  // (the empty ones not asked for: the weight's, else the input's).
  const auto weight_type = weight ? weight->scalar_type() : x.scalar_type();
  const auto bias_type = bias ? bias->scalar_type() : weight_type;
  return {grad_input, grad_weight.to(weight_type), grad_bias.to(bias_type)};
}

} // namespace

TORCH_LIBRARY_IMPL(layernorm_ext, CPU, m) {
  m.impl("layer_norm_forward", &layer_norm_forward_cpu);
  m.impl("fused_add_layer_norm_forward", &fused_add_layer_norm_forward_cpu);
  m.impl("layer_norm_backward", &layer_norm_backward_cpu);
}

} // namespace layernorm_ext::cpu
