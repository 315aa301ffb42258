// Direct Python entry points to the forward ops, for the eager Python
// wrappers. torch.ops.layernorm_ext.<op>(...) boxes every argument into an
// IValue stack and parses the schema in Python's call path: about 1.2 us a
// call, as much as a LayerNorm kernel takes on a small batch (a decode
// step's rows). These call the same ops through the dispatcher, unboxed
// (typed handles), so every dispatch key still applies: autograd, autocast,
// dispatch modes, the tracer, the CPU and CUDA kernels. Each returns what its
// wrapper returns (or needs), not the op's statistics: every tensor handed
// to Python costs a wrapper object (0.1 us each). What the dispatcher
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

// The typed handle of layernorm_ext::<name>; each caller keeps its own in a
// function-local static, so that it is looked up once.
template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").template typed<Signature>();
}

c10::SymIntArrayRef as_sym(const std::vector<int64_t>& sizes) {
  return c10::fromIntArrayRefSlow(sizes);
}

at::Tensor layer_norm(
    const at::Tensor& input, const std::vector<int64_t>& normalized_shape,
    const OptionalTensor& weight, const OptionalTensor& bias, double eps) {
  using Signature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, c10::SymIntArrayRef, const OptionalTensor&, const OptionalTensor&, double);
  static const auto op = op_handle<Signature>("layernorm_ext::layer_norm_forward");
  return std::get<0>(op.call(input, as_sym(normalized_shape), weight, bias, eps));
}

at::Tensor rms_norm(
    const at::Tensor& input, const std::vector<int64_t>& normalized_shape,
    const OptionalTensor& weight, double eps) {
  using Signature = std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, c10::SymIntArrayRef, const OptionalTensor&, double);
  static const auto op = op_handle<Signature>("layernorm_ext::rms_norm_forward");
  return std::get<0>(op.call(input, as_sym(normalized_shape), weight, eps));
}

// (output, new_running_mean, new_running_var).
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm(
    const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
    const OptionalTensor& running_mean, const OptionalTensor& running_var, bool training,
    double momentum, double eps) {
  using Signature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
      const OptionalTensor&, bool, double, double);
  static const auto op = op_handle<Signature>("layernorm_ext::batch_norm_forward");
  auto results = op.call(input, weight, bias, running_mean, running_var, training, momentum, eps);
  return {std::get<0>(results), std::get<3>(results), std::get<4>(results)};
}

// (output, sum).
std::tuple<at::Tensor, at::Tensor> fused_add_layer_norm(
    const at::Tensor& input, const at::Tensor& residual,
    const std::vector<int64_t>& normalized_shape, const OptionalTensor& weight,
    const OptionalTensor& bias, double eps) {
  using Signature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, c10::SymIntArrayRef, const OptionalTensor&,
      const OptionalTensor&, double);
  static const auto op = op_handle<Signature>("layernorm_ext::fused_add_layer_norm_forward");
  auto results = op.call(input, residual, as_sym(normalized_shape), weight, bias, eps);
  return {std::get<0>(results), std::get<1>(results)};
}

// (output, sum).
std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm(
    const at::Tensor& input, const at::Tensor& residual,
    const std::vector<int64_t>& normalized_shape, const OptionalTensor& weight, double eps) {
  using Signature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, c10::SymIntArrayRef, const OptionalTensor&, double);
  static const auto op = op_handle<Signature>("layernorm_ext::fused_add_rms_norm_forward");
  auto results = op.call(input, residual, as_sym(normalized_shape), weight, eps);
  return {std::get<0>(results), std::get<1>(results)};
}

} // namespace

void register_eager_calls(pybind11::module_& m) {
  m.def("layer_norm", &layer_norm);
  m.def("rms_norm", &rms_norm);
  m.def("batch_norm", &batch_norm);
  m.def("fused_add_layer_norm", &fused_add_layer_norm);
  m.def("fused_add_rms_norm", &fused_add_rms_norm);
}

} // namespace layernorm_ext
