// Direct Python entry points to the forward ops, for the eager Python
// wrappers. torch.ops.layernorm_ext.<op>(...) boxes every argument into an
// IValue stack and parses the schema in Python's call path, which costs as
// much as a LayerNorm kernel on a small batch (a decode step's rows;
// benchmarks/bench_call_overhead.py). These call the same ops through the
// dispatcher, unboxed (typed handles, op_handles.h), so every dispatch key
// still applies: autograd, autocast, dispatch modes, the tracer, the CPU and
// CUDA kernels. Each returns what its wrapper returns (or needs), not the
// op's statistics: every tensor handed to Python costs a wrapper object.
// What the dispatcher does not see the wrappers check before taking this
// path: torch.compile tracing and __torch_function__ overrides or modes,
// which go through torch.ops (layernorm_ext/_eager.py).
#include "eager_calls.h"

#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

#include "op_handles.h"

namespace layernorm_ext {
namespace {

using at::Tensor;
using op_handles::ops;
using op_handles::OptionalTensor;

c10::SymIntArrayRef as_sym(const std::vector<int64_t>& sizes) {
  return c10::fromIntArrayRefSlow(sizes);
}

Tensor layer_norm(
    const Tensor& input, const std::vector<int64_t>& normalized_shape,
    const OptionalTensor& weight, const OptionalTensor& bias, double eps) {
  return std::get<0>(
      ops().layer_norm_forward.call(input, as_sym(normalized_shape), weight, bias, eps));
}

Tensor rms_norm(
    const Tensor& input, const std::vector<int64_t>& normalized_shape,
    const OptionalTensor& weight, double eps) {
  return std::get<0>(ops().rms_norm_forward.call(input, as_sym(normalized_shape), weight, eps));
}

// (output, new_running_mean, new_running_var).
std::tuple<Tensor, Tensor, Tensor> batch_norm(
    const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
    const OptionalTensor& running_mean, const OptionalTensor& running_var, bool training,
    double momentum, double eps) {
  auto results = ops().batch_norm_forward.call(
      input, weight, bias, running_mean, running_var, training, momentum, eps);
  return {std::get<0>(results), std::get<3>(results), std::get<4>(results)};
}

// (output, sum).
std::tuple<Tensor, Tensor> fused_add_layer_norm(
    const Tensor& input, const Tensor& residual, const std::vector<int64_t>& normalized_shape,
    const OptionalTensor& weight, const OptionalTensor& bias, double eps) {
  auto results = ops().fused_add_layer_norm_forward.call(
      input, residual, as_sym(normalized_shape), weight, bias, eps);
  return {std::get<0>(results), std::get<1>(results)};
}

// (output, sum).
std::tuple<Tensor, Tensor> fused_add_rms_norm(
    const Tensor& input, const Tensor& residual, const std::vector<int64_t>& normalized_shape,
    const OptionalTensor& weight, double eps) {
  auto results =
      ops().fused_add_rms_norm_forward.call(input, residual, as_sym(normalized_shape), weight, eps);
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
