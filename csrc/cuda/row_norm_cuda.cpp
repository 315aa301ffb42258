// The CUDA kernels of the LayerNorm and RMSNorm ops (row_norm_ops.h writes the
// ops once for every backend): the row-norm launchers of row_norm.cuh on the
// input's device and its current stream. The kernels read the parameters in
// their own dtype (the input's, or float32 for a half/bfloat16 input) and
// write the parameter gradients in it.
#include "../row_norm_ops.h"
#include "row_norm.cuh"
#include "torch_glue.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <type_traits>

namespace layernorm_ext::cuda {
namespace {

// The parameters' dtype (weight and bias share one): the weight's, else the
// bias's (the backward's grad_bias has it), else the input's.
at::ScalarType param_type(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const at::Tensor& bias) {
  if (weight) return weight->scalar_type();
  if (bias.defined()) return bias.scalar_type();
  return input.scalar_type();
}

struct RowNormCudaKernels {
  template <bool kCenter>
  static void forward(const RowNormForward& call) {
    const DeviceGuard device_guard(call.input.device());
    dispatch_input_and_param_types(
        call.input.scalar_type(),
        param_type(call.input, call.weight, call.bias.value_or(at::Tensor())),
        [&](auto* input_tag, auto* param_tag) {
          using T = std::remove_pointer_t<decltype(input_tag)>;
          using P = std::remove_pointer_t<decltype(param_tag)>;
          using acc = acc_t<T>;
          LAYERNORM_EXT_CUDA_CHECK((row_norm_forward_cuda<kCenter>(
              cuda_data<T>(call.input), cuda_data_or_null<T>(call.residual),
              cuda_mutable_data_or_null<T>(call.sum), optional_cuda_data<P>(call.weight),
              optional_cuda_data<P>(call.bias), cuda_mutable_data<T>(call.output),
              mutable_data_or_null<acc>(call.mean),
              call.rstd.mutable_data_ptr<acc>(), call.shape.rows, call.shape.cols, call.eps,
              current_stream())));
        });
  }

  template <bool kCenter>
  static void backward(const RowNormBackward& call) {
    const DeviceGuard device_guard(call.input.device());
    const auto workspace = at::empty(
        {row_norm_backward_workspace_size(
            call.shape.rows, call.shape.cols, call.grad_weight.defined(),
            call.grad_bias.defined())},
        call.input.options().dtype(accumulate_type(call.input.scalar_type())));
    dispatch_input_and_param_types(
        call.input.scalar_type(), param_type(call.input, call.weight, call.grad_bias),
        [&](auto* input_tag, auto* param_tag) {
          using T = std::remove_pointer_t<decltype(input_tag)>;
          using P = std::remove_pointer_t<decltype(param_tag)>;
          using acc = acc_t<T>;
          LAYERNORM_EXT_CUDA_CHECK((row_norm_backward_cuda<kCenter>(
              cuda_data<T>(call.grad_output), cuda_data<T>(call.input),
              data_or_null<acc>(call.mean),
              call.rstd.const_data_ptr<acc>(), optional_cuda_data<P>(call.weight),
              cuda_mutable_data_or_null<T>(call.grad_input),
              cuda_mutable_data_or_null<P>(call.grad_weight),
              cuda_mutable_data_or_null<P>(call.grad_bias), workspace.mutable_data_ptr<acc>(),
              call.shape.rows, call.shape.cols, current_stream())));
        });
  }
};

} // namespace

LAYERNORM_EXT_CUDA_LIBRARY_IMPL(m) {
  register_row_norm_ops<RowNormCudaKernels>(m);
}

} // namespace layernorm_ext::cuda
