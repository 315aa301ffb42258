// The CPU kernels of the BatchNorm ops (batch_norm_ops.h writes the ops once
// for every backend): the channel layout the kernels of batch_norm_kernels.h
// walk, and dtype dispatch to them.
#include "../batch_norm_ops.h"
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

struct BatchNormCpuKernels {
  static void forward(const BatchNormForward& call) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.input.scalar_type(), "batch_norm_forward", [&] {
      using acc = acc_t<scalar_t>;
      batch_norm_forward(BatchNormForwardArgs<scalar_t>{
          call.input.const_data_ptr<scalar_t>(), call.output.mutable_data_ptr<scalar_t>(),
          optional_data<acc>(call.weight), optional_data<acc>(call.bias),
          optional_data<acc>(call.running_mean), optional_data<acc>(call.running_var),
          call.save_mean.mutable_data_ptr<acc>(), call.save_rstd.mutable_data_ptr<acc>(),
          mutable_data_or_null<acc>(call.new_running_mean),
          mutable_data_or_null<acc>(call.new_running_var),
          channel_layout(call.shape, call.format), call.training, call.momentum, call.eps});
    });
  }

  static void backward(const BatchNormBackward& call) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.input.scalar_type(), "batch_norm_backward", [&] {
      using acc = acc_t<scalar_t>;
      batch_norm_backward(BatchNormBackwardArgs<scalar_t>{
          call.grad_output.const_data_ptr<scalar_t>(), call.input.const_data_ptr<scalar_t>(),
          optional_data<acc>(call.weight), call.save_mean.const_data_ptr<acc>(),
          call.save_rstd.const_data_ptr<acc>(), mutable_data_or_null<scalar_t>(call.grad_input),
          mutable_data_or_null<acc>(call.grad_weight), mutable_data_or_null<acc>(call.grad_bias),
          channel_layout(call.shape, call.format), call.training});
    });
  }
};

} // namespace

TORCH_LIBRARY_IMPL(layernorm_ext, CPU, m) {
  register_batch_norm_ops<BatchNormCpuKernels>(m);
}

} // namespace layernorm_ext::cpu
