// RMSNorm on the CPU, plain and with a fused residual add: the LayerNorm row
// kernels without centering (row_norm_kernels.h with kCenter = false), behind
// RMSNorm's own checks.
#include "../row_norm_checks.h"
#include "row_norm_op_helpers.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace layernorm_ext::cpu {
namespace {

// output, input + residual (an undefined tensor without residual), rstd.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_forward_impl(
    const char* op,
    const at::Tensor& input,
    const std::optional<at::Tensor>& residual,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight,
    double eps) {
  const auto shape = check_row_norm_args(op, input, normalized_shape, weight, std::nullopt);
  if (residual) check_residual(op, input, *residual);
  const auto x = input.contiguous();
  const auto res = optional_contiguous(residual);
  const auto acc_type = accumulate_type(x.scalar_type());
  const auto w = param_as_acc(weight, shape.cols, acc_type, 1);
  const auto zero_bias = param_as_acc(std::nullopt, shape.cols, acc_type, 0);
  auto output = at::empty(input.sizes(), x.options());
  auto sum = residual ? at::empty(input.sizes(), x.options()) : at::Tensor();
  auto rstd = at::empty(stats_shape(input, normalized_shape), x.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm_forward", [&] {
    using acc = acc_t<scalar_t>;
    row_norm_forward</*kCenter=*/false>(RowNormForwardArgs<scalar_t>{
        x.const_data_ptr<scalar_t>(), res ? res->const_data_ptr<scalar_t>() : nullptr,
        w.const_data_ptr<acc>(), zero_bias.const_data_ptr<acc>(),
        output.mutable_data_ptr<scalar_t>(), residual ? sum.mutable_data_ptr<scalar_t>() : nullptr,
        nullptr, rstd.mutable_data_ptr<acc>(), shape.rows, shape.cols, eps});
  });
  return {output, sum, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_forward_cpu(
    const at::Tensor& input,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight,
    double eps) {
  auto [output, sum, rstd] =
      rms_norm_forward_impl("rms_norm", input, std::nullopt, normalized_shape, weight, eps);
  return {in_memory_format(output, rms_norm_memory_format(input)), rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_add_rms_norm_forward_cpu(
    const at::Tensor& input,
    const at::Tensor& residual,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight,
    double eps) {
  return rms_norm_forward_impl(
      "fused_add_rms_norm", input, residual, normalized_shape, weight, eps);
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
  const auto acc_type = accumulate_type(x.scalar_type());
  const auto w = param_as_acc(weight, shape.cols, acc_type, 1);
  const bool want_weight = output_mask[1] && weight.has_value();
  auto grad_input = at::empty(output_mask[0] ? input.sizes() : at::IntArrayRef{0}, x.options());
  auto grad_weight =
      at::empty(want_weight ? normalized_shape : at::IntArrayRef{0}, x.options().dtype(acc_type));
  auto partials = grad_partials(shape, int64_t{want_weight}, acc_type);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm_backward", [&] {
    using acc = acc_t<scalar_t>;
    row_norm_backward</*kCenter=*/false>(RowNormBackwardArgs<scalar_t>{
        dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), nullptr,
        rstd.contiguous().const_data_ptr<acc>(), w.const_data_ptr<acc>(),
        output_mask[0] ? grad_input.mutable_data_ptr<scalar_t>() : nullptr,
        want_weight ? grad_weight.mutable_data_ptr<acc>() : nullptr, nullptr,
        partials.mutable_data_ptr<acc>(), shape.rows, shape.cols});
  });
  if (output_mask[0]) grad_input = in_memory_format(grad_input, rms_norm_memory_format(grad_output));
  // Summed in acc_t, returned in the weight's dtype (the input's when empty).
  return {grad_input, grad_weight.to(weight ? weight->scalar_type() : x.scalar_type())};
}

} // namespace

TORCH_LIBRARY_IMPL(layernorm_ext, CPU, m) {
  m.impl("rms_norm_forward", &rms_norm_forward_cpu);
  m.impl("fused_add_rms_norm_forward", &fused_add_rms_norm_forward_cpu);
  m.impl("rms_norm_backward", &rms_norm_backward_cpu);
}

} // namespace layernorm_ext::cpu
