// RMSNorm on CUDA, plain and with a fused residual add: the CPU ops' argument
// checks and output allocation, then the row-norm launchers of row_norm.cuh
// without centering (kCenter = false) on the input's device and its current
// stream.
#include "../row_norm_checks.h"
#include "row_norm.cuh"
#include "torch_glue.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace layernorm_ext::cuda {
namespace {

// A kernel's contiguous output `t` laid out in `format` (see the CPU ops'
// in_memory_format): `t` itself for Contiguous, else a copy.
at::Tensor in_memory_format(const at::Tensor& t, at::MemoryFormat format) {
  if (format == at::MemoryFormat::Contiguous) return t;
  return at::empty(t.sizes(), t.options().memory_format(format)).copy_(t);
}

// output (contiguous), input + residual (an undefined tensor without
// residual), rstd.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_forward_impl(
    const char* op,
    const at::Tensor& input,
    const std::optional<at::Tensor>& residual,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight,
    double eps) {
  const auto shape = check_row_norm_args(op, input, normalized_shape, weight, std::nullopt);
  if (residual) check_residual(op, input, *residual);
  const DeviceGuard device_guard(input.device());
  const auto x = input.contiguous();
  const auto res = cpu::optional_contiguous(residual);
  const auto w = cpu::optional_contiguous(weight);
  auto output = at::empty(input.sizes(), x.options());
  auto sum = residual ? at::empty(input.sizes(), x.options()) : at::Tensor();
  auto rstd = at::empty(
      stats_shape(input, normalized_shape), x.options().dtype(accumulate_type(x.scalar_type())));
  cpu::dispatch_input_and_param_types(x.scalar_type(), w ? w->scalar_type() : x.scalar_type(),
      [&](auto* t_tag, auto* w_tag) {
        using T = std::remove_pointer_t<decltype(t_tag)>;
        using P = std::remove_pointer_t<decltype(w_tag)>;
        using acc = cpu::acc_t<T>;
        LAYERNORM_EXT_CUDA_CHECK((row_norm_forward_cuda</*kCenter=*/false>(
            cuda_data<T>(x), optional_cuda_data<T>(res),
            residual ? cuda_mutable_data<T>(sum) : nullptr, optional_cuda_data<P>(w),
            static_cast<const cuda_t<P>*>(nullptr), cuda_mutable_data<T>(output),
            static_cast<acc*>(nullptr), rstd.mutable_data_ptr<acc>(), shape.rows, shape.cols, eps,
            current_stream())));
      });
  return {output, sum, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_forward_cuda(
    const at::Tensor& input,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight,
    double eps) {
  auto [output, sum, rstd] =
      rms_norm_forward_impl("rms_norm", input, std::nullopt, normalized_shape, weight, eps);
  return {in_memory_format(output, rms_norm_memory_format(input)), rstd};
}

// Both outputs contiguous, as the CPU op's and the fake kernel's are.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_add_rms_norm_forward_cuda(
    const at::Tensor& input,
    const at::Tensor& residual,
    at::IntArrayRef normalized_shape,
    const std::optional<at::Tensor>& weight,
    double eps) {
  return rms_norm_forward_impl(
      "fused_add_rms_norm", input, residual, normalized_shape, weight, eps);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cuda(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    at::IntArrayRef normalized_shape,
    const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight,
    std::array<bool, 2> output_mask) {
  const auto shape =
      check_row_norm_args("rms_norm_backward", input, normalized_shape, weight, std::nullopt);
  check_row_norm_backward_args("rms_norm_backward", grad_output, input, shape, {&rstd});
  const DeviceGuard device_guard(input.device());
  const auto x = input.contiguous();
  const auto dy = grad_output.contiguous();
  const auto w = cpu::optional_contiguous(weight);
  const auto saved_rstd = rstd.contiguous();
  const auto param_options = weight.has_value() ? weight->options() : x.options();
  const bool want_weight = output_mask[1] && weight.has_value();
  auto grad_input = output_mask[0] ? at::empty(input.sizes(), x.options()) : at::empty({0}, x.options());
  auto grad_weight = want_weight ? at::empty(normalized_shape, param_options) : at::empty({0}, param_options);
  auto workspace = at::empty(
      {row_norm_backward_workspace_size(shape.rows, shape.cols, want_weight, false)},
      x.options().dtype(accumulate_type(x.scalar_type())));
  cpu::dispatch_input_and_param_types(x.scalar_type(), w ? w->scalar_type() : x.scalar_type(),
      [&](auto* t_tag, auto* w_tag) {
        using T = std::remove_pointer_t<decltype(t_tag)>;
        using P = std::remove_pointer_t<decltype(w_tag)>;
        using acc = cpu::acc_t<T>;
        LAYERNORM_EXT_CUDA_CHECK((row_norm_backward_cuda</*kCenter=*/false>(
            cuda_data<T>(dy), cuda_data<T>(x), static_cast<const acc*>(nullptr),
            saved_rstd.const_data_ptr<acc>(), optional_cuda_data<P>(w),
            output_mask[0] ? cuda_mutable_data<T>(grad_input) : nullptr,
            want_weight ? cuda_mutable_data<P>(grad_weight) : nullptr,
            static_cast<cuda_t<P>*>(nullptr), workspace.mutable_data_ptr<acc>(), shape.rows,
            shape.cols, current_stream())));
      });
  if (output_mask[0]) grad_input = in_memory_format(grad_input, rms_norm_memory_format(grad_output));
  return {grad_input, grad_weight};
}

} // namespace

LAYERNORM_EXT_CUDA_LIBRARY_IMPL(m) {
  m.impl("rms_norm_forward", &rms_norm_forward_cuda);
  m.impl("fused_add_rms_norm_forward", &fused_add_rms_norm_forward_cuda);
  m.impl("rms_norm_backward", &rms_norm_backward_cuda);
}

} // namespace layernorm_ext::cuda
