// The CUDA kernels of the BatchNorm ops (batch_norm_ops.h writes the ops once
// for every backend): the launchers of batch_norm.cuh on the input's device
// and its current stream.
#include "../batch_norm_ops.h"
#include "batch_norm.cuh"
#include "torch_glue.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

namespace layernorm_ext::cuda {
namespace {

BatchNormLayout layout_of(const ChannelShape& shape, at::MemoryFormat format) {
  // With one value per sample and channel, NCHW is an N x C matrix: the
  // channels-last kernels read it with coalesced rows.
  return {shape.batch, shape.channels, shape.inner,
          format != at::MemoryFormat::Contiguous || shape.inner == 1};
}

// Scratch of batch_norm_workspace_bytes for the launchers.
template <typename T>
at::Tensor workspace_for(const BatchNormLayout& layout, const at::Tensor& input) {
  return at::empty(
      {batch_norm_workspace_bytes<cuda_t<T>>(layout)}, input.options().dtype(at::kByte));
}

struct BatchNormCudaKernels {
  static void forward(const BatchNormForward& call) {
    const DeviceGuard device_guard(call.input.device());
    const auto layout = layout_of(call.shape, call.format);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.input.scalar_type(), "batch_norm_forward_cuda", [&] {
      using T = scalar_t;
      using acc = acc_t<T>;
      const auto workspace = workspace_for<T>(layout, call.input);
      if (call.training) {
        LAYERNORM_EXT_CUDA_CHECK(batch_norm_forward_training_cuda<cuda_t<T>>(
            cuda_data<T>(call.input), optional_data<acc>(call.weight),
            optional_data<acc>(call.bias), optional_data<acc>(call.running_mean),
            optional_data<acc>(call.running_var), cuda_mutable_data<T>(call.output),
            call.save_mean.mutable_data_ptr<acc>(), call.save_rstd.mutable_data_ptr<acc>(),
            mutable_data_or_null<acc>(call.new_running_mean),
            mutable_data_or_null<acc>(call.new_running_var), call.momentum, call.eps, layout,
            workspace.mutable_data_ptr(), current_stream()));
      } else {
        LAYERNORM_EXT_CUDA_CHECK(batch_norm_forward_eval_cuda<cuda_t<T>>(
            cuda_data<T>(call.input), optional_data<acc>(call.weight),
            optional_data<acc>(call.bias), optional_data<acc>(call.running_mean),
            optional_data<acc>(call.running_var), cuda_mutable_data<T>(call.output),
            call.save_mean.mutable_data_ptr<acc>(), call.save_rstd.mutable_data_ptr<acc>(),
            call.eps, layout, workspace.mutable_data_ptr(), current_stream()));
      }
    });
  }

  static void backward(const BatchNormBackward& call) {
    const DeviceGuard device_guard(call.input.device());
    const auto layout = layout_of(call.shape, call.format);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.input.scalar_type(), "batch_norm_backward_cuda", [&] {
      using T = scalar_t;
      using acc = acc_t<T>;
      const auto workspace = workspace_for<T>(layout, call.input);
      LAYERNORM_EXT_CUDA_CHECK(batch_norm_backward_cuda<cuda_t<T>>(
          cuda_data<T>(call.grad_output), cuda_data<T>(call.input),
          optional_data<acc>(call.weight), call.save_mean.const_data_ptr<acc>(),
          call.save_rstd.const_data_ptr<acc>(), call.training,
          cuda_mutable_data_or_null<T>(call.grad_input),
          mutable_data_or_null<acc>(call.grad_weight), mutable_data_or_null<acc>(call.grad_bias),
          layout, workspace.mutable_data_ptr(), current_stream()));
    });
  }
};

} // namespace

LAYERNORM_EXT_CUDA_LIBRARY_IMPL(m) {
  register_batch_norm_ops<BatchNormCudaKernels>(m);
}

} // namespace layernorm_ext::cuda
