// LayerNorm on CUDA, plain and with a fused residual add: the CPU ops'
// argument checks and output allocation, then the row-norm launchers of
// row_norm.cuh (kCenter = true) on the input's device and its current stream.
#include "../row_norm_checks.h"
#include "row_norm.cuh"
#include "torch_glue.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace layernorm_ext::cuda {
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
  const DeviceGuard device_guard(input.device());
  const auto x = input.contiguous();
  const auto res = cpu::optional_contiguous(residual);
  const auto w = cpu::optional_contiguous(weight);
  const auto b = cpu::optional_contiguous(bias);
  auto output = at::empty(input.sizes(), x.options());
  auto sum = residual ? at::empty(input.sizes(), x.options()) : at::Tensor();
  const auto stats_options = x.options().dtype(accumulate_type(x.scalar_type()));
  auto mean = at::empty(stats_shape(input, normalized_shape), stats_options);
  auto rstd = at::empty(stats_shape(input, normalized_shape), stats_options);
  const auto param_type = w ? w->scalar_type() : (b ? b->scalar_type() : x.scalar_type());
  cpu::dispatch_input_and_param_types(x.scalar_type(), param_type,
      [&](auto* t_tag, auto* w_tag) {
        using T = std::remove_pointer_t<decltype(t_tag)>;
        using P = std::remove_pointer_t<decltype(w_tag)>;
        using acc = cpu::acc_t<T>;
        LAYERNORM_EXT_CUDA_CHECK((row_norm_forward_cuda</*kCenter=*/true>(
            cuda_data<T>(x), optional_cuda_data<T>(res),
            residual ? cuda_mutable_data<T>(sum) : nullptr, optional_cuda_data<P>(w),
            optional_cuda_data<P>(b), cuda_mutable_data<T>(output), mean.mutable_data_ptr<acc>(),
            rstd.mutable_data_ptr<acc>(), shape.rows, shape.cols, eps, current_stream())));
      });
  return {output, sum, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward_cuda(
    const at::Tensor& input,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    double eps) {
  auto [output, sum, mean, rstd] = layer_norm_forward_impl(
      "layer_norm", input, std::nullopt, normalized_shape, weight, bias, eps);
  return {output, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_add_layer_norm_forward_cuda(
    const at::Tensor& input,
    const at::Tensor& residual,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    double eps) {
  return layer_norm_forward_impl(
      "fused_add_layer_norm", input, residual, normalized_shape, weight, bias, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward_cuda(
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
  const DeviceGuard device_guard(input.device());
  const auto x = input.contiguous();
  const auto dy = grad_output.contiguous();
  const auto w = cpu::optional_contiguous(weight);
  const auto saved_mean = mean.contiguous();
  const auto saved_rstd = rstd.contiguous();
  const auto param_options = weight.has_value() ? weight->options() : x.options();
  const bool want_weight = output_mask[1] && weight.has_value();
  const bool want_bias = output_mask[2] && bias.has_value();
  auto grad_input = output_mask[0] ? at::empty(input.sizes(), x.options()) : at::empty({0}, x.options());
  auto grad_weight = want_weight ? at::empty(normalized_shape, param_options) : at::empty({0}, param_options);
  const auto bias_options = bias.has_value() ? bias->options() : param_options;
  auto grad_bias = want_bias ? at::empty(normalized_shape, bias_options) : at::empty({0}, bias_options);
  auto workspace = at::empty(
      {row_norm_backward_workspace_size(shape.rows, shape.cols, want_weight, want_bias)},
      x.options().dtype(accumulate_type(x.scalar_type())));
  const auto param_type = weight ? weight->scalar_type() : (bias ? bias->scalar_type() : x.scalar_type());
  cpu::dispatch_input_and_param_types(x.scalar_type(), param_type,
      [&](auto* t_tag, auto* w_tag) {
        using T = std::remove_pointer_t<decltype(t_tag)>;
        using P = std::remove_pointer_t<decltype(w_tag)>;
        using acc = cpu::acc_t<T>;
        LAYERNORM_EXT_CUDA_CHECK((row_norm_backward_cuda</*kCenter=*/true>(
            cuda_data<T>(dy), cuda_data<T>(x), saved_mean.const_data_ptr<acc>(),
            saved_rstd.const_data_ptr<acc>(), optional_cuda_data<P>(w),
            output_mask[0] ? cuda_mutable_data<T>(grad_input) : nullptr,
            want_weight ? cuda_mutable_data<P>(grad_weight) : nullptr,
            want_bias ? cuda_mutable_data<P>(grad_bias) : nullptr,
            workspace.mutable_data_ptr<acc>(), shape.rows, shape.cols, current_stream())));
      });
  return {grad_input, grad_weight, grad_bias};
}

} // namespace

LAYERNORM_EXT_CUDA_LIBRARY_IMPL(m) {
  m.impl("layer_norm_forward", &layer_norm_forward_cuda);
  m.impl("fused_add_layer_norm_forward", &fused_add_layer_norm_forward_cuda);
  m.impl("layer_norm_backward", &layer_norm_backward_cuda);
}

} // namespace layernorm_ext::cuda
