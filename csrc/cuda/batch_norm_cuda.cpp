// BatchNorm on CUDA: the CPU op's argument checks (batch_norm_checks.h) and
// output conventions, then the launchers of batch_norm.cuh on the input's
// device and its current stream. The [C] parameters and running statistics
// are handed to the kernels in the accumulation dtype (converted here, a few
// bytes a channel), and results go back in the parameters' own dtypes.
#include "../batch_norm_checks.h"
#include "../row_norm_checks.h"
#include "batch_norm.cuh"
#include "torch_glue.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

namespace layernorm_ext::cuda {
namespace {

BatchNormLayout layout_of(const ChannelShape& shape, bool channels_last) {
  // With one value per sample and channel, NCHW is an N x C matrix: the
  // channels-last kernels read it with coalesced rows.
  return {shape.batch, shape.channels, shape.inner, channels_last || shape.inner == 1};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_forward_impl(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    bool training,
    double momentum,
    double eps) {
  const auto shape =
      check_batch_norm_args(input, weight, bias, running_mean, running_var, training);
  const DeviceGuard device_guard(input.device());
  const auto format = batch_norm_memory_format(input);
  const auto x = input.contiguous(format);
  const auto layout = layout_of(shape, format != at::MemoryFormat::Contiguous);
  const auto acc_type = accumulate_type(x.scalar_type());
  const auto acc_options = x.options().dtype(acc_type);
  const auto w = cpu::optional_contiguous_as(weight, acc_type);
  const auto b = cpu::optional_contiguous_as(bias, acc_type);
  const auto rm = cpu::optional_contiguous_as(running_mean, acc_type);
  const auto rv = cpu::optional_contiguous_as(running_var, acc_type);
  auto output = at::empty(x.sizes(), x.options().memory_format(format));
  auto save_mean = at::empty({layout.channels}, acc_options);
  auto save_rstd = at::empty({layout.channels}, acc_options);
  const bool update_mean = training && running_mean.has_value();
  const bool update_var = training && running_var.has_value();
  auto new_mean = at::empty({update_mean ? layout.channels : 0}, acc_options);
  auto new_var = at::empty({update_var ? layout.channels : 0}, acc_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_forward_cuda", [&] {
    using T = scalar_t;
    using acc = cpu::acc_t<T>;
    auto workspace = at::empty({batch_norm_workspace_bytes<cuda_t<T>>(layout)}, x.options().dtype(at::kByte));
    if (training) {
      LAYERNORM_EXT_CUDA_CHECK(batch_norm_forward_training_cuda<cuda_t<T>>(
          cuda_data<T>(x), cpu::optional_data<acc>(w), cpu::optional_data<acc>(b), cpu::optional_data<acc>(rm),
          cpu::optional_data<acc>(rv), cuda_mutable_data<T>(output), save_mean.mutable_data_ptr<acc>(),
          save_rstd.mutable_data_ptr<acc>(), update_mean ? new_mean.mutable_data_ptr<acc>() : nullptr,
          update_var ? new_var.mutable_data_ptr<acc>() : nullptr, momentum, eps, layout,
          workspace.mutable_data_ptr(), current_stream()));
    } else {
      LAYERNORM_EXT_CUDA_CHECK(batch_norm_forward_eval_cuda<cuda_t<T>>(
          cuda_data<T>(x), cpu::optional_data<acc>(w), cpu::optional_data<acc>(b), cpu::optional_data<acc>(rm),
          cpu::optional_data<acc>(rv), cuda_mutable_data<T>(output), save_mean.mutable_data_ptr<acc>(),
          save_rstd.mutable_data_ptr<acc>(), eps, layout, workspace.mutable_data_ptr(),
          current_stream()));
    }
  });
  return {output, save_mean, save_rstd, batch_norm_new_running_stat(x, running_mean, new_mean),
          batch_norm_new_running_stat(x, running_var, new_var)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_impl(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& save_mean,
    const at::Tensor& save_rstd,
    bool training,
    std::array<bool, 3> output_mask) {
  const auto shape = check_batch_norm_affine_args(input, weight, bias);
  check_batch_norm_backward_args(grad_output, input, save_mean, save_rstd);
  const DeviceGuard device_guard(input.device());
  const auto format = batch_norm_memory_format(input);
  const auto x = input.contiguous(format);
  const auto dy = grad_output.contiguous(format);
  const auto layout = layout_of(shape, format != at::MemoryFormat::Contiguous);
  const auto acc_type = accumulate_type(x.scalar_type());
  const auto acc_options = x.options().dtype(acc_type);
  const auto w = cpu::optional_contiguous_as(weight, acc_type);
  const auto mean = save_mean.contiguous();
  const auto rstd = save_rstd.contiguous();
  const bool want_weight = output_mask[1] && weight.has_value();
  const bool want_bias = output_mask[2] && bias.has_value();
  auto grad_input = output_mask[0] ? at::empty(x.sizes(), x.options().memory_format(format))
                                   : at::empty({0}, x.options());
  auto grad_weight_acc = at::empty({want_weight ? layout.channels : 0}, acc_options);
  auto grad_bias_acc = at::empty({want_bias ? layout.channels : 0}, acc_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_backward_cuda", [&] {
    using T = scalar_t;
    using acc = cpu::acc_t<T>;
    auto workspace = at::empty({batch_norm_workspace_bytes<cuda_t<T>>(layout)}, x.options().dtype(at::kByte));
    LAYERNORM_EXT_CUDA_CHECK(batch_norm_backward_cuda<cuda_t<T>>(
        cuda_data<T>(dy), cuda_data<T>(x), cpu::optional_data<acc>(w), mean.const_data_ptr<acc>(),
        rstd.const_data_ptr<acc>(), training,
        output_mask[0] ? cuda_mutable_data<T>(grad_input) : nullptr,
        want_weight ? grad_weight_acc.mutable_data_ptr<acc>() : nullptr,
        want_bias ? grad_bias_acc.mutable_data_ptr<acc>() : nullptr, layout,
        workspace.mutable_data_ptr(), current_stream()));
  });
  auto [grad_weight, grad_bias] = batch_norm_param_grads(
      x, weight, bias, want_weight, grad_weight_acc, want_bias, grad_bias_acc);
  return {grad_input, grad_weight, grad_bias};
}

} // namespace

LAYERNORM_EXT_CUDA_LIBRARY_IMPL(m) {
  m.impl("batch_norm_forward", &batch_norm_forward_impl);
  m.impl("batch_norm_backward", &batch_norm_backward_impl);
}

} // namespace layernorm_ext::cuda
