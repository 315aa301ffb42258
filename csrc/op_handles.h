// The ops' C++ signatures (their schemas: op_schemas.h), written once, and
// their typed dispatcher handles. A typed handle calls an op unboxed: no
// IValue stack, no schema parsing, every dispatch key still applies. The
// autograd kernels (autograd_*_ops.cpp) call the ops below them through these,
// the eager entry points (eager_calls.cpp) call them from Python.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <optional>
#include <tuple>

namespace layernorm_ext::op_handles {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

// normalized_shape is SymInt[] in the schemas: under torch.compile(dynamic=True)
// and opcheck's aot_dispatch_dynamic test the sizes are symbolic.

// (output, mean, rstd)(input, normalized_shape, weight, bias, eps)
using LayerNormForward = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, c10::SymIntArrayRef, const OptionalTensor&, const OptionalTensor&, double);
// (grad_input, grad_weight, grad_bias)(grad_output, input, normalized_shape,
// mean, rstd, weight, bias, output_mask)
using LayerNormBackward = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, c10::SymIntArrayRef, const Tensor&, const Tensor&,
    const OptionalTensor&, const OptionalTensor&, std::array<bool, 3>);
// (output, rstd)(input, normalized_shape, weight, eps)
using RmsNormForward = std::tuple<Tensor, Tensor>(
    const Tensor&, c10::SymIntArrayRef, const OptionalTensor&, double);
// (grad_input, grad_weight)(grad_output, input, normalized_shape, rstd,
// weight, output_mask)
using RmsNormBackward = std::tuple<Tensor, Tensor>(
    const Tensor&, const Tensor&, c10::SymIntArrayRef, const Tensor&, const OptionalTensor&,
    std::array<bool, 2>);
// (output, sum, mean, rstd)(input, residual, normalized_shape, weight, bias, eps)
using FusedAddLayerNormForward = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, c10::SymIntArrayRef, const OptionalTensor&,
    const OptionalTensor&, double);
// (output, sum, rstd)(input, residual, normalized_shape, weight, eps)
using FusedAddRmsNormForward = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, c10::SymIntArrayRef, const OptionalTensor&, double);
// (output, save_mean, save_rstd, new_running_mean, new_running_var)(input,
// weight, bias, running_mean, running_var, training, momentum, eps)
using BatchNormForward = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
    const OptionalTensor&, bool, double, double);
// (grad_input, grad_weight, grad_bias)(grad_output, input, weight, bias,
// save_mean, save_rstd, training, output_mask)
using BatchNormBackward = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const OptionalTensor&, const OptionalTensor&, const Tensor&,
    const Tensor&, bool, std::array<bool, 3>);

template <class Signature>
using Handle = c10::TypedOperatorHandle<Signature>;

template <class Signature>
Handle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Looked up on the first call, after ops.cpp has defined the schemas.
struct Ops {
  Handle<LayerNormForward> layer_norm_forward =
      find_op<LayerNormForward>("layernorm_ext::layer_norm_forward");
  Handle<LayerNormBackward> layer_norm_backward =
      find_op<LayerNormBackward>("layernorm_ext::layer_norm_backward");
  Handle<RmsNormForward> rms_norm_forward =
      find_op<RmsNormForward>("layernorm_ext::rms_norm_forward");
  Handle<RmsNormBackward> rms_norm_backward =
      find_op<RmsNormBackward>("layernorm_ext::rms_norm_backward");
  Handle<FusedAddLayerNormForward> fused_add_layer_norm_forward =
      find_op<FusedAddLayerNormForward>("layernorm_ext::fused_add_layer_norm_forward");
  Handle<FusedAddRmsNormForward> fused_add_rms_norm_forward =
      find_op<FusedAddRmsNormForward>("layernorm_ext::fused_add_rms_norm_forward");
  Handle<BatchNormForward> batch_norm_forward =
      find_op<BatchNormForward>("layernorm_ext::batch_norm_forward");
  Handle<BatchNormBackward> batch_norm_backward =
      find_op<BatchNormBackward>("layernorm_ext::batch_norm_backward");
};

inline const Ops& ops() {
  static const Ops handles;
  return handles;
}

}  // namespace layernorm_ext::op_handles
