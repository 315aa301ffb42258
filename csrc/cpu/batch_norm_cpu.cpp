// BatchNorm on the CPU: argument checks, memory-layout choice, output
// allocation and dtype dispatch around the kernels of batch_norm_kernels.h.
#include "../batch_norm_checks.h"
#include "../row_norm_checks.h"
#include "batch_norm_kernels.h"
#include "output_cache.h"

#include <ATen/ATen.h>
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

// The dtype the parameters share (the checks guarantee they share one), or
// the input's when none is given.
at::ScalarType param_type(
    const at::Tensor& input, std::initializer_list<const std::optional<at::Tensor>*> params) {
  for (const auto* p : params) {
    if (p->has_value()) return (*p)->scalar_type();
  }
  return input.scalar_type();
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
  const auto w = optional_contiguous(weight);
  const auto b = optional_contiguous(bias);
  const auto old_mean = optional_contiguous(running_mean);
  const auto old_var = optional_contiguous(running_var);
  auto output = empty_output(input.sizes(), x.options(), format);
  const auto stats_options = x.options().dtype(accumulate_type(x.scalar_type()));
  auto save_mean = at::empty({shape.channels}, stats_options);
  auto save_rstd = at::empty({shape.channels}, stats_options);
  const bool update = training && running_mean.has_value();
  const auto running_options = running_mean.has_value() ? running_mean->options() : x.options();
  auto new_mean = at::empty({update ? shape.channels : 0}, running_options);
  auto new_var = at::empty({update ? shape.channels : 0}, running_options);
  dispatch_input_and_param_types(
      x.scalar_type(), param_type(x, {&weight, &bias, &running_mean, &running_var}),
      [&](auto* t_tag, auto* w_tag) {
        using T = std::remove_pointer_t<decltype(t_tag)>;
        using P = std::remove_pointer_t<decltype(w_tag)>;
        batch_norm_forward(
            x.const_data_ptr<T>(), optional_data<P>(w), optional_data<P>(b),
            optional_data<P>(old_mean), optional_data<P>(old_var), output.mutable_data_ptr<T>(),
            save_mean.mutable_data_ptr<acc_t<T>>(), save_rstd.mutable_data_ptr<acc_t<T>>(),
            update ? new_mean.mutable_data_ptr<P>() : nullptr,
            update ? new_var.mutable_data_ptr<P>() : nullptr, channel_layout(shape, format),
            training, momentum, eps);
      });
  return {output, save_mean, save_rstd, new_mean, new_var};
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
  const auto w = optional_contiguous(weight);
  const auto mean = save_mean.contiguous();
  const auto rstd = save_rstd.contiguous();
  const bool want_input = output_mask[0];
  const bool want_weight = output_mask[1] && weight.has_value();
  const bool want_bias = output_mask[2] && bias.has_value();
  const auto weight_options = weight.has_value() ? weight->options() : x.options();
  const auto bias_options = bias.has_value() ? bias->options() : weight_options;
  auto grad_input = want_input ? empty_output(input.sizes(), x.options(), format)
                               : at::empty({0}, x.options());
  auto grad_weight = at::empty({want_weight ? shape.channels : 0}, weight_options);
  auto grad_bias = at::empty({want_bias ? shape.channels : 0}, bias_options);
  dispatch_input_and_param_types(
      x.scalar_type(), param_type(x, {&weight, &bias}), [&](auto* t_tag, auto* w_tag) {
        using T = std::remove_pointer_t<decltype(t_tag)>;
        using P = std::remove_pointer_t<decltype(w_tag)>;
        batch_norm_backward(
            dy.const_data_ptr<T>(), x.const_data_ptr<T>(), optional_data<P>(w),
            mean.const_data_ptr<acc_t<T>>(), rstd.const_data_ptr<acc_t<T>>(),
            want_input ? grad_input.mutable_data_ptr<T>() : nullptr,
            want_weight ? grad_weight.mutable_data_ptr<P>() : nullptr,
            want_bias ? grad_bias.mutable_data_ptr<P>() : nullptr, channel_layout(shape, format),
            training);
      });
  return {grad_input, grad_weight, grad_bias};
}

} // namespace

TORCH_LIBRARY_IMPL(layernorm_ext, CPU, m) {
  m.impl("batch_norm_forward", &batch_norm_forward_cpu);
  m.impl("batch_norm_backward", &batch_norm_backward_cpu);
}

} // namespace layernorm_ext::cpu
