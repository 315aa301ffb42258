// Direct Python entry points to the forward ops, for the eager Python
// wrappers. torch.ops.layernorm_ext.<op>(...) boxes every argument into an
// IValue stack and parses the schema in Python's call path: about 1.2 us a
// call, as much as a LayerNorm kernel takes on a small batch (a decode
// step's rows). These call the same ops through the dispatcher, unboxed
// (typed handles), so every dispatch key still applies: autograd, autocast,
// dispatch modes, the tracer, the CPU and CUDA kernels. What the dispatcher
// does not see the wrappers check before taking this path: torch.compile
// tracing and __torch_function__ overrides or modes, which go through
// torch.ops (layernorm_ext/_eager.py).
#include "eager_calls.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

namespace layernorm_ext {
namespace {

using OptionalTensor = std::optional<at::Tensor>;

// The typed handle of layernorm_ext::<name>, looked up once.
template <typename Signature>
const c10::TypedOperatorHandle<Signature>& op_handle(const char* name) {
  // One static per Signature and call site: each caller passes one name.
  static const auto handle = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow(name, "")
                                 .template typed<Signature>();
  return handle;
}

c10::SymIntArrayRef as_sym(const std::vector<int64_t>& sizes) {
  return c10::fromIntArrayRefSlow(sizes);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward(
    const at::Tensor& input, const std::vector<int64_t>& normalized_shape,
    const OptionalTensor& weight, const OptionalTensor& bias, double eps) {
  using Signature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, c10::SymIntArrayRef, const OptionalTensor&, const OptionalTensor&, double);
  return op_handle<Signature>("layernorm_ext::layer_norm_forward")
      .call(input, as_sym(normalized_shape), weight, bias, eps);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_forward(
    const at::Tensor& input, const std::vector<int64_t>& normalized_shape,
    const OptionalTensor& weight, double eps) {
  using Signature = std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, c10::SymIntArrayRef, const OptionalTensor&, double);
  return op_handle<Signature>("layernorm_ext::rms_norm_forward")
      .call(input, as_sym(normalized_shape), weight, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_forward(
    const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
    const OptionalTensor& running_mean, const OptionalTensor& running_var, bool training,
    double momentum, double eps) {
  using Signature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
      const OptionalTensor&, bool, double, double);
  return op_handle<Signature>("layernorm_ext::batch_norm_forward")
      .call(input, weight, bias, running_mean, running_var, training, momentum, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_add_layer_norm_forward(
    const at::Tensor& input, const at::Tensor& residual,
    const std::vector<int64_t>& normalized_shape, const OptionalTensor& weight,
    const OptionalTensor& bias, double eps) {
  using Signature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, c10::SymIntArrayRef, const OptionalTensor&,
      const OptionalTensor&, double);
  return op_handle<Signature>("layernorm_ext::fused_add_layer_norm_forward")
      .call(input, residual, as_sym(normalized_shape), weight, bias, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_add_rms_norm_forward(
    const at::Tensor& input, const at::Tensor& residual,
    const std::vector<int64_t>& normalized_shape, const OptionalTensor& weight, double eps) {
  using Signature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, c10::SymIntArrayRef, const OptionalTensor&, double);
  return op_handle<Signature>("layernorm_ext::fused_add_rms_norm_forward")
      .call(input, residual, as_sym(normalized_shape), weight, eps);
}

} // namespace

void register_eager_calls(pybind11::module_& m) {
  m.def("layer_norm_forward", &layer_norm_forward);
  m.def("rms_norm_forward", &rms_norm_forward);
  m.def("batch_norm_forward", &batch_norm_forward);
  m.def("fused_add_layer_norm_forward", &fused_add_layer_norm_forward);
  m.def("fused_add_rms_norm_forward", &fused_add_rms_norm_forward);
}

} // namespace layernorm_ext
