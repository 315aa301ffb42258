// The BatchNorm ops (forward and backward), written once for every backend:
// the checks (batch_norm_checks.h), the memory format the kernels run in, the
// arguments made contiguous in it, the [C] parameters and running statistics
// in the accumulation type (converted here, a few bytes a channel), the
// outputs allocated; then the backend's kernels; then the results in the
// dtypes torch's ops give. A backend supplies `Kernels` with
//   static void forward(const BatchNormForward&);
//   static void backward(const BatchNormBackward&);
// which fill the outputs, and registers the ops with
// register_batch_norm_ops<Kernels>(m): cpu/batch_norm_cpu.cpp,
// cuda/batch_norm_cuda.cpp.
#pragma once

#include "batch_norm_checks.h"
#include "op_arguments.h"
#include "row_norm_checks.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

namespace layernorm_ext {

// A forward call as the kernels see it: input and output in `format`, the
// [C] tensors contiguous in the accumulation type.
struct BatchNormForward {
  ChannelShape shape;
  at::MemoryFormat format = at::MemoryFormat::Contiguous;
  at::Tensor input;
  std::optional<at::Tensor> weight, bias;  // absent when not given
  // Eval: the statistics that normalize. Training: the old running
  // statistics (absent without them).
  std::optional<at::Tensor> running_mean, running_var;
  bool training = false;
  double momentum = 0, eps = 0;
  at::Tensor output;
  // Training: the batch mean and 1 / sqrt(var + eps); eval: the running ones.
  at::Tensor save_mean, save_rstd;
  // Training with running statistics: their momentum update; else undefined.
  at::Tensor new_running_mean, new_running_var;
};

// A backward call as the kernels see it. Each gradient is undefined when not
// asked for (a parameter's also when the parameter is absent); the parameter
// gradients in the accumulation type.
struct BatchNormBackward {
  ChannelShape shape;
  at::MemoryFormat format = at::MemoryFormat::Contiguous;
  at::Tensor grad_output, input;
  std::optional<at::Tensor> weight;
  at::Tensor save_mean, save_rstd;
  bool training = false;
  at::Tensor grad_input, grad_weight, grad_bias;
};

namespace batch_norm_ops {

template <class Kernels>
struct Ops {
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
      const at::Tensor& input,
      const std::optional<at::Tensor>& weight,
      const std::optional<at::Tensor>& bias,
      const std::optional<at::Tensor>& running_mean,
      const std::optional<at::Tensor>& running_var,
      bool training,
      double momentum,
      double eps) {
    BatchNormForward call;
    call.shape = check_batch_norm_args(input, weight, bias, running_mean, running_var, training);
    call.format = batch_norm_memory_format(input);
    call.input = input.contiguous(call.format);
    const auto acc_type = accumulate_type(input.scalar_type());
    const auto acc_options = call.input.options().dtype(acc_type);
    call.weight = optional_contiguous_as(weight, acc_type);
    call.bias = optional_contiguous_as(bias, acc_type);
    call.running_mean = optional_contiguous_as(running_mean, acc_type);
    call.running_var = optional_contiguous_as(running_var, acc_type);
    call.training = training;
    call.momentum = momentum;
    call.eps = eps;
    call.output = at::empty(input.sizes(), call.input.options().memory_format(call.format));
    call.save_mean = at::empty({call.shape.channels}, acc_options);
    call.save_rstd = at::empty({call.shape.channels}, acc_options);
    // check_batch_norm_args: both running statistics or neither.
    if (training && running_mean.has_value()) {
      call.new_running_mean = at::empty({call.shape.channels}, acc_options);
      call.new_running_var = at::empty({call.shape.channels}, acc_options);
    }
    Kernels::forward(call);
    const auto new_stat = [&](const std::optional<at::Tensor>& running, const at::Tensor& stat) {
      return batch_norm_new_running_stat(call.input, running, or_empty(stat, acc_options));
    };
    return {call.output, call.save_mean, call.save_rstd,
            new_stat(running_mean, call.new_running_mean), new_stat(running_var, call.new_running_var)};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
      const at::Tensor& grad_output,
      const at::Tensor& input,
      const std::optional<at::Tensor>& weight,
      const std::optional<at::Tensor>& bias,
      const at::Tensor& save_mean,
      const at::Tensor& save_rstd,
      bool training,
      std::array<bool, 3> output_mask) {
    BatchNormBackward call;
    call.shape = check_batch_norm_affine_args(input, weight, bias);
    check_batch_norm_backward_args(grad_output, input, save_mean, save_rstd);
    call.format = batch_norm_memory_format(input);
    call.input = input.contiguous(call.format);
    call.grad_output = grad_output.contiguous(call.format);
    const auto acc_type = accumulate_type(input.scalar_type());
    const auto acc_options = call.input.options().dtype(acc_type);
    call.weight = optional_contiguous_as(weight, acc_type);
    call.save_mean = save_mean.contiguous();
    call.save_rstd = save_rstd.contiguous();
    call.training = training;
    const bool want_weight = output_mask[1] && weight.has_value();
    const bool want_bias = output_mask[2] && bias.has_value();
    if (output_mask[0]) {
      call.grad_input =
          at::empty(input.sizes(), call.input.options().memory_format(call.format));
    }
    if (want_weight) call.grad_weight = at::empty({call.shape.channels}, acc_options);
    if (want_bias) call.grad_bias = at::empty({call.shape.channels}, acc_options);
    Kernels::backward(call);
    auto [grad_weight, grad_bias] = batch_norm_param_grads(
        call.input, weight, bias, want_weight, call.grad_weight, want_bias, call.grad_bias);
    return {or_empty(call.grad_input, call.input.options()), grad_weight, grad_bias};
  }
};

}  // namespace batch_norm_ops

template <class Kernels>
void register_batch_norm_ops(torch::Library& m) {
  m.impl("batch_norm_forward", &batch_norm_ops::Ops<Kernels>::forward);
  m.impl("batch_norm_backward", &batch_norm_ops::Ops<Kernels>::backward);
}

}  // namespace layernorm_ext
