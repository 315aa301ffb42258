// LayerNorm on the CPU: argument checks, output allocation and dtype
// dispatch around the row kernels of row_norm_kernels.h.
#include "../row_norm_checks.h"
#include "row_norm_kernels.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace layernorm_ext::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward_cpu(
    const at::Tensor& input,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    double eps) {
  const auto shape =
      check_row_norm_args("layer_norm", input, normalized_shape, weight, bias);
  const auto x = input.contiguous();
  const auto w = optional_contiguous(weight);
  const auto b = optional_contiguous(bias);
  auto output = at::empty(input.sizes(), x.options());
  const auto stats_options = x.options().dtype(accumulate_type(x.scalar_type()));
  auto mean = at::empty(stats_shape(input, normalized_shape), stats_options);
  auto rstd = at::empty(stats_shape(input, normalized_shape), stats_options);
  const auto param_type = w ? w->scalar_type() : (b ? b->scalar_type() : x.scalar_type());
  dispatch_input_and_param_types(x.scalar_type(), param_type,
      [&](auto* t_tag, auto* w_tag) {
        using T = std::remove_pointer_t<decltype(t_tag)>;
        using P = std::remove_pointer_t<decltype(w_tag)>;
        row_norm_forward</*kCenter=*/true>(
            x.const_data_ptr<T>(), optional_data<P>(w), optional_data<P>(b),
            output.mutable_data_ptr<T>(), mean.mutable_data_ptr<acc_t<T>>(),
            rstd.mutable_data_ptr<acc_t<T>>(), shape.rows, shape.cols, eps);
      });
  return {output, mean, rstd};
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
  const auto w = optional_contiguous(weight);
  const auto param_options = weight.has_value() ? weight->options() : x.options();
  const bool want_weight = output_mask[1] && weight.has_value();
  const bool want_bias = output_mask[2] && bias.has_value();
  auto grad_input = output_mask[0] ? at::empty(input.sizes(), x.options()) : at::empty({0}, x.options());
  auto grad_weight = want_weight ? at::empty(normalized_shape, param_options) : at::empty({0}, param_options);
  const auto bias_options = bias.has_value() ? bias->options() : param_options;
  auto grad_bias = want_bias ? at::empty(normalized_shape, bias_options) : at::empty({0}, bias_options);
  const auto param_type = weight ? weight->scalar_type() : (bias ? bias->scalar_type() : x.scalar_type());
  dispatch_input_and_param_types(x.scalar_type(), param_type,
      [&](auto* t_tag, auto* w_tag) {
        using T = std::remove_pointer_t<decltype(t_tag)>;
        using P = std::remove_pointer_t<decltype(w_tag)>;
        row_norm_backward</*kCenter=*/true>(
            dy.const_data_ptr<T>(), x.const_data_ptr<T>(),
            mean.contiguous().const_data_ptr<acc_t<T>>(), rstd.contiguous().const_data_ptr<acc_t<T>>(),
            optional_data<P>(w),
            output_mask[0] ? grad_input.mutable_data_ptr<T>() : nullptr,
            want_weight ? grad_weight.mutable_data_ptr<P>() : nullptr,
            want_bias ? grad_bias.mutable_data_ptr<P>() : nullptr,
            shape.rows, shape.cols);
      });
  return {grad_input, grad_weight, grad_bias};
}

} // namespace

TORCH_LIBRARY_IMPL(layernorm_ext, CPU, m) {
  m.impl("layer_norm_forward", &layer_norm_forward_cpu);
  m.impl("layer_norm_backward", &layer_norm_backward_cpu);
}

} // namespace layernorm_ext::cpu
