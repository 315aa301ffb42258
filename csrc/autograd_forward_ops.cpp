// Autograd of the forward ops (layer_norm_forward, rms_norm_forward, the
// fused_add_* ops, batch_norm_forward), one registration for every backend
// (DispatchKey Autograd); how they record: autograd_recording.h.
//
// Their Node calls the backward ops (the fast kernels) for grad_output, plus
// the input's gradient through the returned statistics (whose incoming
// gradients are usually undefined); every tangent uses the differentiable
// ATen formulas of autograd_formulas.h. Under compiled autograd the Node's
// backward is one call in the graph (compiled_autograd_calls.h).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "autograd_formulas.h"
#include "autograd_recording.h"
#include "compiled_autograd_calls.h"
#include "op_handles.h"

namespace layernorm_ext {
namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;
using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
using torch::dynamo::autograd::CompiledNodeArgs;
using torch::dynamo::autograd::SwapSavedVariables;
using namespace autograd_recording;
using op_handles::ops;
namespace formulas = autograd_formulas;
namespace compiled = compiled_autograd_calls;
using formulas::add_defined;

enum class NormKind { kLayerNorm, kRmsNorm, kBatchNorm };

// The backward of a forward op's Node: what it computes with besides the
// incoming gradients, and how.
struct ForwardOpBackward {
  // The kind of norm, whether it was fused with the residual add (the
  // normalized tensor is then the returned sum), normalized_shape (row
  // norms), and which of the incoming gradients is of which output (-1:
  // that output is not returned).
  struct Config {
    NormKind kind = NormKind::kLayerNorm;
    formulas::Norm norm;
    bool fused = false;
    std::vector<c10::SymInt> normalized_shape;
    int sum_slot = -1, mean_slot = -1, rstd_slot = -1;
  };

  // The saved tensors (undefined when absent).
  struct Saved {
    Tensor normalized, weight, bias, mean, rstd;
  };

  template <class C, class F>
  static void config_fields(C& c, F&& f) {
    auto& groups = c.norm.groups;
    f(c.kind, groups.group_dims, groups.param_dims, groups.stat_unit_dims, groups.per_channel,
      c.norm.center, c.norm.batch_stats, c.fused, c.normalized_shape, c.sum_slot, c.mean_slot,
      c.rstd_slot);
  }

  template <class S, class F>
  static void saved_fields(S& s, F&& f) {
    f(s.normalized, s.weight, s.bias, s.mean, s.rstd);
  }

  // The Node's next edges: (input, [residual], weight, bias).
  static std::vector<Tensor> edge_arguments(const Config& config, const Saved& saved, size_t) {
    if (config.fused) return {saved.normalized, saved.normalized, saved.weight, saved.bias};
    return {saved.normalized, saved.weight, saved.bias};
  }

  // The gradients of the op's arguments (input, [residual], weight, bias),
  // from those of its outputs with history: the backward op for grad_output,
  // plus the input's path through the returned statistics; the fused ops'
  // residual gets the same gradient as their input. `wanted` says which
  // arguments' gradients to compute.
  static variable_list gradients(
      const Config& config,
      const Saved& saved,
      const variable_list& grads,
      const std::vector<bool>& wanted);
};

// The backward ops return [0]-shaped tensors for the gradients not asked
// for; autograd wants undefined ones.
template <size_t N>
void keep_masked(std::array<Tensor, N>& grads, const std::array<bool, N>& mask) {
  for (size_t i = 0; i < N; ++i) {
    if (!mask[i]) grads[i] = Tensor();
  }
}

variable_list ForwardOpBackward::gradients(
    const Config& config,
    const Saved& saved,
    const variable_list& grads,
    const std::vector<bool>& wanted) {
  const size_t addends = config.fused ? 2 : 1;
  const auto& [normalized, weight, bias, mean, rstd] = saved;
  const std::array<bool, 3> mask{
      wanted[0] || (config.fused && wanted[1]), weight.defined() && wanted[addends],
      bias.defined() && wanted[addends + 1]};

  std::array<Tensor, 3> g;  // of (normalized, weight, bias)
  const auto& grad_output = grads[0];
  if (grad_output.defined()) {
    const bool record = Recording(grad_output, normalized, mean, rstd, weight, bias).any();
    switch (config.kind) {
      case NormKind::kLayerNorm:
        std::tie(g[0], g[1], g[2]) = call_op(
            ops().layer_norm_backward, record, grad_output, normalized, config.normalized_shape,
            mean, rstd, optional_if_defined(weight), optional_if_defined(bias), mask);
        break;
      case NormKind::kRmsNorm:
        std::tie(g[0], g[1]) = call_op(
            ops().rms_norm_backward, record, grad_output, normalized, config.normalized_shape,
            rstd, optional_if_defined(weight), std::array<bool, 2>{mask[0], mask[1]});
        break;
      case NormKind::kBatchNorm:
        std::tie(g[0], g[1], g[2]) = call_op(
            ops().batch_norm_backward, record, grad_output, normalized,
            optional_if_defined(weight), optional_if_defined(bias), mean, rstd,
            config.norm.batch_stats, mask);
        break;
    }
  }
  keep_masked(g, mask);
  if (mask[0] && config.norm.batch_stats) {
    g[0] = add_defined(
        g[0],
        formulas::statistics_gradient(
            config.norm, normalized, mean, rstd,
            config.mean_slot >= 0 ? grads[config.mean_slot] : Tensor(), grads[config.rstd_slot]));
  }
  if (config.fused) g[0] = add_defined(g[0], grads[config.sum_slot]);
  // The op's parameter gradients have the shape of the statistics' groups'
  // parameters; a BatchNorm parameter may have any shape of C elements.
  if (g[1].defined()) g[1] = g[1].view_as(weight);
  if (g[2].defined()) g[2] = g[2].view_as(bias);

  variable_list out;
  out.push_back(wanted[0] ? g[0] : Tensor());
  if (config.fused) out.push_back(wanted[1] ? g[0] : Tensor());
  out.push_back(g[1]);
  out.push_back(g[2]);
  return out;
}

// The grad_fn of a forward op's outputs (output, [sum], [mean], rstd). Its
// next edges are (input, [residual], weight, bias): an absent parameter (and
// RMSNorm's bias) has an invalid edge.
struct NormForwardNode : Node {
  // The saved variables, listed once (const or not, as the node is).
  template <class Self>
  static auto saved_variables(Self& self) {
    return std::array{&self.normalized_, &self.weight_, &self.bias_, &self.mean_, &self.rstd_};
  }

  std::string name() const override {
    switch (config.kind) {
      case NormKind::kLayerNorm:
        return config.fused ? "FusedAddLayerNormBackward" : "LayerNormBackward";
      case NormKind::kRmsNorm:
        return config.fused ? "FusedAddRmsNormBackward" : "RmsNormBackward";
      case NormKind::kBatchNorm:
        return "BatchNormBackward";
    }
    return "NormBackward";
  }

  void release_variables() override {
    for (auto* v : saved_variables(*this)) v->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    return ForwardOpBackward::gradients(config, unpack(), grads, compiled::wanted_edges(*this, false));
  }

  void compiled_args(CompiledNodeArgs& args) const override {
    // The outputs among the saved tensors are saved as outputs.
    args.collect(normalized_, /*is_output=*/config.fused);
    args.collect(weight_, false);
    args.collect(bias_, false);
    args.collect(mean_, true);
    args.collect(rstd_, true);
    ForwardOpBackward::config_fields(
        config, [&](const auto&... fields) { compiled::collect_fields(args, fields...); });
  }

  variable_list apply_with_saved(const variable_list& grads, SwapSavedVariables& swap) override {
    swap.before(config.normalized_shape);
    for (auto* v : saved_variables(*this)) swap.before(*v);
    auto result =
        compiled::call_packed_in_graph<ForwardOpBackward>(*this, swap, config, unpack(), grads);
    for (auto* v : saved_variables(*this)) swap.after(*v);
    swap.after(config.normalized_shape);
    return result;
  }

  ForwardOpBackward::Saved unpack() {
    const auto self = getptr();
    return {normalized_.unpack(config.fused ? self : nullptr), weight_.unpack(), bias_.unpack(),
            mean_.unpack(self), rstd_.unpack(self)};
  }

  ForwardOpBackward::Config config;
  SavedVariable normalized_, weight_, bias_, mean_, rstd_;
};

// A forward op call: what it normalized, with what, and what it returned.
struct ForwardCall {
  ForwardCall(NormKind kind, formulas::Norm norm) : kind(kind), norm(std::move(norm)) {}

  NormKind kind;
  formulas::Norm norm;
  Tensor input;
  Tensor residual;  // the fused ops' (which normalize sum = input + residual)
  c10::SymIntArrayRef normalized_shape;  // row norms
  OptionalTensor weight, bias;
  Tensor output;
  Tensor sum;   // the fused ops'
  Tensor mean;  // undefined for RMSNorm
  Tensor rstd;

  bool fused() const { return residual.defined(); }
};

void record_forward(const ForwardCall& call, const Recording& recording) {
  const bool fused = call.fused();
  NormForwardNode* node = nullptr;
  if (recording.reverse) {
    auto owner = make_node<NormForwardNode>();
    node = static_cast<NormForwardNode*>(owner.get());
    auto& config = node->config;
    config.kind = call.kind;
    config.norm = call.norm;
    config.fused = fused;
    config.normalized_shape = call.normalized_shape.vec();
    node->set_next_edges(
        fused ? torch::autograd::collect_next_edges(
                    call.input, call.residual, call.weight, call.bias)
              : torch::autograd::collect_next_edges(call.input, call.weight, call.bias));
    std::vector<Tensor> with_history{call.output};
    if (fused) {
      config.sum_slot = static_cast<int>(with_history.size());
      with_history.push_back(call.sum);
    }
    if (call.mean.defined()) {
      config.mean_slot = static_cast<int>(with_history.size());
      with_history.push_back(call.mean);
    }
    config.rstd_slot = static_cast<int>(with_history.size());
    with_history.push_back(call.rstd);
    torch::autograd::set_history(with_history, owner);
  }
  if (recording.forward) {
    // The fused ops normalize sum = input + residual: d sum = d input + d residual.
    const auto d_normalized = fused
        ? add_defined(tangent_of(call.input), tangent_of(call.residual))
        : tangent_of(call.input);
    const auto tangents = formulas::forward_tangents(
        call.norm, fused ? call.sum : primal_of(call.input), call.mean, call.rstd,
        primal_of(call.weight), d_normalized, tangent_of(call.weight), tangent_of(call.bias),
        call.output.scalar_type());
    set_tangent(call.output, tangents.output);
    if (fused && d_normalized.defined()) {
      set_tangent(call.sum, d_normalized.to(call.sum.scalar_type()));
    }
    if (call.mean.defined()) set_tangent(call.mean, tangents.mean);
    set_tangent(call.rstd, tangents.rstd);
  }
  if (node != nullptr) {
    // Saved after the outputs got their tangents, which a saved variable
    // keeps (forward over reverse); outputs are saved as outputs (no
    // reference cycle through their grad_fn).
    node->normalized_ = SavedVariable(fused ? call.sum : call.input, /*is_output=*/fused);
    node->weight_ = SavedVariable(call.weight, false);
    node->bias_ = SavedVariable(call.bias, false);
    if (call.mean.defined()) node->mean_ = SavedVariable(call.mean, true);
    node->rstd_ = SavedVariable(call.rstd, true);
  }
}

ForwardCall row_norm_call(
    NormKind kind, const Tensor& input, c10::SymIntArrayRef normalized_shape) {
  ForwardCall call(
      kind,
      {formulas::Groups::rows(input.dim(), static_cast<int64_t>(normalized_shape.size())),
       /*center=*/kind == NormKind::kLayerNorm, /*batch_stats=*/true});
  call.input = input;
  call.normalized_shape = normalized_shape;
  return call;
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_forward_autograd(
    const Tensor& input,
    c10::SymIntArrayRef normalized_shape,
    const OptionalTensor& weight,
    const OptionalTensor& bias,
    double eps) {
  const Recording recording(input, weight, bias);
  auto outputs =
      call_below_autograd(ops().layer_norm_forward, input, normalized_shape, weight, bias, eps);
  if (recording.any()) {
    auto call = row_norm_call(NormKind::kLayerNorm, input, normalized_shape);
    call.weight = weight;
    call.bias = bias;
    std::tie(call.output, call.mean, call.rstd) = outputs;
    record_forward(call, recording);
  }
  return outputs;
}

std::tuple<Tensor, Tensor> rms_norm_forward_autograd(
    const Tensor& input,
    c10::SymIntArrayRef normalized_shape,
    const OptionalTensor& weight,
    double eps) {
  const Recording recording(input, weight);
  auto outputs = call_below_autograd(ops().rms_norm_forward, input, normalized_shape, weight, eps);
  if (recording.any()) {
    auto call = row_norm_call(NormKind::kRmsNorm, input, normalized_shape);
    call.weight = weight;
    std::tie(call.output, call.rstd) = outputs;
    record_forward(call, recording);
  }
  return outputs;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> fused_add_layer_norm_forward_autograd(
    const Tensor& input,
    const Tensor& residual,
    c10::SymIntArrayRef normalized_shape,
    const OptionalTensor& weight,
    const OptionalTensor& bias,
    double eps) {
  const Recording recording(input, residual, weight, bias);
  auto outputs = call_below_autograd(
      ops().fused_add_layer_norm_forward, input, residual, normalized_shape, weight, bias, eps);
  if (recording.any()) {
    auto call = row_norm_call(NormKind::kLayerNorm, input, normalized_shape);
    call.residual = residual;
    call.weight = weight;
    call.bias = bias;
    std::tie(call.output, call.sum, call.mean, call.rstd) = outputs;
    record_forward(call, recording);
  }
  return outputs;
}

std::tuple<Tensor, Tensor, Tensor> fused_add_rms_norm_forward_autograd(
    const Tensor& input,
    const Tensor& residual,
    c10::SymIntArrayRef normalized_shape,
    const OptionalTensor& weight,
    double eps) {
  const Recording recording(input, residual, weight);
  auto outputs = call_below_autograd(
      ops().fused_add_rms_norm_forward, input, residual, normalized_shape, weight, eps);
  if (recording.any()) {
    auto call = row_norm_call(NormKind::kRmsNorm, input, normalized_shape);
    call.residual = residual;
    call.weight = weight;
    std::tie(call.output, call.sum, call.rstd) = outputs;
    record_forward(call, recording);
  }
  return outputs;
}

// The running statistics are state that the wrapper copies into the buffers,
// not something to differentiate (nor are torch's): they get no history and
// no tangent.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> batch_norm_forward_autograd(
    const Tensor& input,
    const OptionalTensor& weight,
    const OptionalTensor& bias,
    const OptionalTensor& running_mean,
    const OptionalTensor& running_var,
    bool training,
    double momentum,
    double eps) {
  const Recording recording(input, weight, bias);
  auto outputs = call_below_autograd(
      ops().batch_norm_forward, input, weight, bias, running_mean, running_var, training,
      momentum, eps);
  if (recording.any()) {
    ForwardCall call(
        NormKind::kBatchNorm,
        {formulas::Groups::channels(input.dim()), /*center=*/true, /*batch_stats=*/training});
    call.input = input;
    call.weight = weight;
    call.bias = bias;
    std::tie(call.output, call.mean, call.rstd, std::ignore, std::ignore) = outputs;
    record_forward(call, recording);
  }
  return outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(layernorm_ext, Autograd, m) {
  m.impl("layer_norm_forward", &layer_norm_forward_autograd);
  m.impl("rms_norm_forward", &rms_norm_forward_autograd);
  m.impl("fused_add_layer_norm_forward", &fused_add_layer_norm_forward_autograd);
  m.impl("fused_add_rms_norm_forward", &fused_add_rms_norm_forward_autograd);
  m.impl("batch_norm_forward", &batch_norm_forward_autograd);
}

}  // namespace layernorm_ext
