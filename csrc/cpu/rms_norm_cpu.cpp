// RMSNorm on the CPU: the LayerNorm row kernels without centering
// (row_norm_kernels.h with kCenter = false), behind RMSNorm's own checks.
#include "../row_norm_checks.h"
#include "row_norm_kernels.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace layernorm_ext::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> rms_norm_forward_cpu(
    const at::Tensor& input,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight,
    double eps) {
  const auto shape = check_row_norm_args("rms_norm", input, normalized_shape, weight, std::nullopt);
  const auto x = input.contiguous();
  const auto w = optional_contiguous(weight);
  auto output = at::empty(input.sizes(), x.options());
  auto rstd = at::empty(
      stats_shape(input, normalized_shape), x.options().dtype(accumulate_type(x.scalar_type())));
  dispatch_input_and_param_types(x.scalar_type(), w ? w->scalar_type() : x.scalar_type(),
      [&](auto* t_tag, auto* w_tag) {
        using T = std::remove_pointer_t<decltype(t_tag)>;
        using P = std::remove_pointer_t<decltype(w_tag)>;
        row_norm_forward</*kCenter=*/false>(
            x.const_data_ptr<T>(), optional_data<P>(w), static_cast<const P*>(nullptr),
            output.mutable_data_ptr<T>(), static_cast<acc_t<T>*>(nullptr),
            rstd.mutable_data_ptr<acc_t<T>>(), shape.rows, shape.cols, eps);
      });
  return {output, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    at::IntArrayRef normalized_shape,
    const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight,
    std::array<bool, 2> output_mask) {
  const auto shape =
      check_row_norm_args("rms_norm_backward", input, normalized_shape, weight, std::nullopt);
  check_row_norm_backward_args("rms_norm_backward", grad_output, input, shape, {&rstd});
  const auto x = input.contiguous();
  const auto dy = grad_output.contiguous();
  const auto w = optional_contiguous(weight);
  const auto param_options = weight.has_value() ? weight->options() : x.options();
  const bool want_weight = output_mask[1] && weight.has_value();
  auto grad_input = output_mask[0] ? at::empty(input.sizes(), x.options()) : at::empty({0}, x.options());
  auto grad_weight = want_weight ? at::empty(normalized_shape, param_options) : at::empty({0}, param_options);
  dispatch_input_and_param_types(x.scalar_type(), w ? w->scalar_type() : x.scalar_type(),
      [&](auto* t_tag, auto* w_tag) {
        using T = std::remove_pointer_t<decltype(t_tag)>;
        using P = std::remove_pointer_t<decltype(w_tag)>;
        row_norm_backward</*kCenter=*/false>(
            dy.const_data_ptr<T>(), x.const_data_ptr<T>(), static_cast<const acc_t<T>*>(nullptr),
            rstd.contiguous().const_data_ptr<acc_t<T>>(), optional_data<P>(w),
            output_mask[0] ? grad_input.mutable_data_ptr<T>() : nullptr,
            want_weight ? grad_weight.mutable_data_ptr<P>() : nullptr, static_cast<P*>(nullptr),
            shape.rows, shape.cols);
      });
  return {grad_input, grad_weight};
}

} // namespace

TORCH_LIBRARY_IMPL(layernorm_ext, CPU, m) {
  m.impl("rms_norm_forward", &rms_norm_forward_cpu);
  m.impl("rms_norm_backward", &rms_norm_backward_cpu);
}

} // namespace layernorm_ext::cpu
