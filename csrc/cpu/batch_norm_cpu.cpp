// BatchNorm on the CPU: argument checks, memory-layout choice, output
// allocation and dtype dispatch around the kernels of batch_norm_kernels.h.
// The [C] parameters and running statistics are handed to the kernels in the
// accumulation dtype (converted here, a few bytes a channel), and results go
// back in the parameters' own dtypes.
#include "../batch_norm_checks.h"
#include "../row_norm_checks.h"
#include "batch_norm_kernels.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

namespace layernorm_ext::cpu {
namespace {

// How the kernels see a tensor laid out in batch_norm_memory_format(input).
ChannelLayout channel_layout(const ChannelShape& shape, at::MemoryFormat format) {
  if (format != at::MemoryFormat::Contiguous) {
    return {shape.batch * shape.inner, shape.channels, 1};
  }
  // One channel is one contiguous run: a single plane splits evenly into
  // blocks and thread ranges, where N planes of a 2-D (N, 1) input would be
  // runs of one element.
  if (shape.channels == 1) return {1, 1, shape.batch * shape.inner};
  return {shape.batch, shape.channels, shape.inner};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_forward_cpu(
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
  const auto format = batch_norm_memory_format(input);
  const auto x = input.contiguous(format);
  const auto acc_type = accumulate_type(x.scalar_type());
  const auto acc_options = x.options().dtype(acc_type);
  const auto w = optional_contiguous_as(weight, acc_type);
  const auto b = optional_contiguous_as(bias, acc_type);
  const auto old_mean = optional_contiguous_as(running_mean, acc_type);
  const auto old_var = optional_contiguous_as(running_var, acc_type);
  auto output = at::empty(input.sizes(), x.options().memory_format(format));
  auto save_mean = at::empty({shape.channels}, acc_options);
  auto save_rstd = at::empty({shape.channels}, acc_options);
  const bool update = training && running_mean.has_value();
  auto new_mean = at::empty({update ? shape.channels : 0}, acc_options);
  auto new_var = at::empty({update ? shape.channels : 0}, acc_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_forward", [&] {
    using acc = acc_t<scalar_t>;
    batch_norm_forward(BatchNormForwardArgs<scalar_t>{
        x.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), optional_data<acc>(w),
        optional_data<acc>(b), optional_data<acc>(old_mean), optional_data<acc>(old_var),
        save_mean.mutable_data_ptr<acc>(), save_rstd.mutable_data_ptr<acc>(),
        update ? new_mean.mutable_data_ptr<acc>() : nullptr,
        update ? new_var.mutable_data_ptr<acc>() : nullptr, channel_layout(shape, format),
        training, momentum, eps});
  });
  return {output, save_mean, save_rstd, batch_norm_new_running_stat(x, running_mean, new_mean),
          batch_norm_new_running_stat(x, running_var, new_var)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cpu(
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
  const auto format = batch_norm_memory_format(input);
  const auto x = input.contiguous(format);
  const auto dy = grad_output.contiguous(format);
  const auto acc_type = accumulate_type(x.scalar_type());
  const auto acc_options = x.options().dtype(acc_type);
  const auto w = optional_contiguous_as(weight, acc_type);
  const auto mean = save_mean.contiguous();
  const auto rstd = save_rstd.contiguous();
  const bool want_input = output_mask[0];
  const bool want_weight = output_mask[1] && weight.has_value();
  const bool want_bias = output_mask[2] && bias.has_value();
  auto grad_input = want_input ? at::empty(input.sizes(), x.options().memory_format(format))
                               : at::empty({0}, x.options());
  auto grad_weight_acc = at::empty({want_weight ? shape.channels : 0}, acc_options);
  auto grad_bias_acc = at::empty({want_bias ? shape.channels : 0}, acc_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_backward", [&] {
    using acc = acc_t<scalar_t>;
    batch_norm_backward(BatchNormBackwardArgs<scalar_t>{
        dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), optional_data<acc>(w),
        mean.const_data_ptr<acc>(), rstd.const_data_ptr<acc>(),
        want_input ? grad_input.mutable_data_ptr<scalar_t>() : nullptr,
        want_weight ? grad_weight_acc.mutable_data_ptr<acc>() : nullptr,
        want_bias ? grad_bias_acc.mutable_data_ptr<acc>() : nullptr,
        channel_layout(shape, format), training});
  });
  auto [grad_weight, grad_bias] = batch_norm_param_grads(
      x, weight, bias, want_weight, grad_weight_acc, want_bias, grad_bias_acc);
  return {grad_input, grad_weight, grad_bias};
}

} // namespace

TORCH_LIBRARY_IMPL(layernorm_ext, CPU, m) {
  m.impl("batch_norm_forward", &batch_norm_forward_cpu);
  m.impl("batch_norm_backward", &batch_norm_backward_cpu);
}

} // namespace layernorm_ext::cpu
