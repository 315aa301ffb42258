// Autograd of the backward ops (layer_norm_backward, rms_norm_backward,
// batch_norm_backward): double backward, hessians, forward over reverse.
// One registration for every backend (DispatchKey Autograd); how they
// record: autograd_recording.h.
//
// Every gradient and tangent uses the differentiable ATen formulas of
// autograd_formulas.h, so that derivatives of any order exist. The formulas
// speak of five arguments (grad_output, input, mean, rstd, weight); each op
// passes them in its own order, with other arguments among them (`Argument`
// names each op argument's role). Under compiled autograd the Node's
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
#include <utility>
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

// What a backward op's tensor argument is to the formulas. kOther: an
// argument that gets no gradient (the bias, which only gives grad_bias its
// dtype).
enum Argument : int64_t { kGradOutput, kInput, kMean, kRstd, kWeight, kOther };
constexpr size_t kFormulaArguments = 5;

// The backward of a backward op's Node: what it computes with besides the
// incoming gradients, and how.
struct BackwardOpBackward {
  // The norm, which outputs the op computed, and `edge_of`: the next edge
  // (the op's tensor argument) that each of the formulas' gradients
  // (grad_output, input, mean, rstd, weight) goes to; -1: none (RMSNorm's
  // mean).
  struct Config {
    formulas::Norm norm;
    std::array<bool, 3> output_mask{};
    std::vector<int64_t> edge_of;
  };

  using Saved = formulas::BackwardInputs;

  template <class C, class F>
  static void config_fields(C& c, F&& f) {
    auto& groups = c.norm.groups;
    f(groups.group_dims, groups.param_dims, groups.stat_unit_dims, groups.per_channel,
      c.norm.center, c.norm.batch_stats, c.output_mask, c.edge_of);
  }

  template <class S, class F>
  static void saved_fields(S& s, F&& f) {
    f(s.grad_output, s.input, s.mean, s.rstd, s.weight);
  }

  static std::vector<Tensor> edge_arguments(const Config& config, const Saved& saved, size_t edges) {
    const std::array<Tensor, kFormulaArguments> formula_arguments{
        saved.grad_output, saved.input, saved.mean, saved.rstd, saved.weight};
    std::vector<Tensor> arguments(edges);
    for (size_t i = 0; i < kFormulaArguments; ++i) {
      if (config.edge_of[i] >= 0) arguments[config.edge_of[i]] = formula_arguments[i];
    }
    return arguments;
  }

  // The gradients of the op's tensor arguments from those of its outputs.
  static variable_list gradients(
      const Config& config,
      const Saved& saved,
      const variable_list& grads,
      const std::vector<bool>& wanted) {
    const auto incoming = [&](size_t i) {
      return i < grads.size() && config.output_mask[i] ? grads[i] : Tensor();
    };
    const auto gradients =
        formulas::backward_gradients(config.norm, saved, incoming(0), incoming(1), incoming(2));
    variable_list out(wanted.size());
    for (size_t i = 0; i < kFormulaArguments; ++i) {
      const auto edge = config.edge_of[i];
      if (edge >= 0 && wanted[edge]) out[edge] = gradients[i];
    }
    return out;
  }
};

// The grad_fn of a backward op's outputs (grad_input, grad_weight,
// [grad_bias]), whose next edges are the op's tensor arguments.
struct NormBackwardNode : Node {
  // The saved variables, listed once (const or not, as the node is).
  template <class Self>
  static auto saved_variables(Self& self) {
    return std::array{&self.grad_output_, &self.input_, &self.mean_, &self.rstd_, &self.weight_};
  }

  std::string name() const override { return name_; }

  void release_variables() override {
    for (auto* v : saved_variables(*this)) v->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    return BackwardOpBackward::gradients(config, unpack(), grads, compiled::wanted_edges(*this, false));
  }

  void compiled_args(CompiledNodeArgs& args) const override {
    for (const auto* v : saved_variables(*this)) args.collect(*v, false);
    BackwardOpBackward::config_fields(
        config, [&](const auto&... fields) { compiled::collect_fields(args, fields...); });
  }

  variable_list apply_with_saved(const variable_list& grads, SwapSavedVariables& swap) override {
    for (auto* v : saved_variables(*this)) swap.before(*v);
    auto result =
        compiled::call_packed_in_graph<BackwardOpBackward>(*this, swap, config, unpack(), grads);
    for (auto* v : saved_variables(*this)) swap.after(*v);
    return result;
  }

  formulas::BackwardInputs unpack() const {
    return {grad_output_.unpack(), input_.unpack(), mean_.unpack(), rstd_.unpack(),
            weight_.unpack()};
  }

  std::string name_;
  BackwardOpBackward::Config config;
  SavedVariable grad_output_, input_, mean_, rstd_, weight_;
};

// A backward op call: its Node's name, the norm, its tensor arguments in the
// op's order with what each is to the formulas, which outputs it computed and
// what it returned.
struct BackwardCall {
  std::string name;
  formulas::Norm norm;
  std::vector<std::pair<Argument, Tensor>> arguments;
  std::array<bool, 3> output_mask;
  std::vector<Tensor> outputs;
};

void record_backward(const BackwardCall& call, const Recording& recording) {
  formulas::BackwardInputs args;  // undefined where the op has no such argument
  const std::array<Tensor*, kFormulaArguments> formula_argument{
      &args.grad_output, &args.input, &args.mean, &args.rstd, &args.weight};
  Tensor bias;
  std::vector<int64_t> edge_of(kFormulaArguments, -1);
  std::vector<Tensor> edge_tensors;
  for (const auto& [role, tensor] : call.arguments) {
    if (role == kOther) {
      bias = tensor;
      edge_tensors.emplace_back();
    } else {
      *formula_argument[role] = tensor;
      edge_of[role] = static_cast<int64_t>(edge_tensors.size());
      edge_tensors.push_back(tensor);
    }
  }
  if (recording.reverse) {
    auto node = make_node<NormBackwardNode>();
    auto* n = static_cast<NormBackwardNode*>(node.get());
    n->name_ = call.name;
    n->config = {call.norm, call.output_mask, std::move(edge_of)};
    n->set_next_edges(torch::autograd::collect_next_edges(edge_tensors));
    torch::autograd::set_history(call.outputs, node);
    n->grad_output_ = SavedVariable(args.grad_output, false);
    n->input_ = SavedVariable(args.input, false);
    n->mean_ = SavedVariable(args.mean, false);
    n->rstd_ = SavedVariable(args.rstd, false);
    n->weight_ = SavedVariable(args.weight, false);
  }
  if (recording.forward) {
    const formulas::BackwardInputs primals{
        primal_of(args.grad_output), primal_of(args.input), primal_of(args.mean),
        primal_of(args.rstd), primal_of(args.weight)};
    const formulas::BackwardInputs tangents{
        tangent_of(args.grad_output), tangent_of(args.input), tangent_of(args.mean),
        tangent_of(args.rstd), tangent_of(args.weight)};
    const auto out =
        formulas::backward_tangents(call.norm, primals, bias, tangents, call.output_mask);
    for (size_t i = 0; i < call.outputs.size(); ++i) set_tangent(call.outputs[i], out[i]);
  }
}

formulas::Norm row_norm(bool center, int64_t dim, c10::SymIntArrayRef normalized_shape) {
  return {formulas::Groups::rows(dim, static_cast<int64_t>(normalized_shape.size())), center,
          /*batch_stats=*/true};
}

Tensor value_or_undefined(const OptionalTensor& t) {
  return t.value_or(Tensor());
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_backward_autograd(
    const Tensor& grad_output,
    const Tensor& input,
    c10::SymIntArrayRef normalized_shape,
    const Tensor& mean,
    const Tensor& rstd,
    const OptionalTensor& weight,
    const OptionalTensor& bias,
    std::array<bool, 3> output_mask) {
  const Recording recording(grad_output, input, mean, rstd, weight, bias);
  auto outputs = call_below_autograd(
      ops().layer_norm_backward, grad_output, input, normalized_shape, mean, rstd, weight, bias,
      output_mask);
  if (recording.any()) {
    const auto& [grad_input, grad_weight, grad_bias] = outputs;
    record_backward(
        {"LayerNormBackwardBackward",
         row_norm(/*center=*/true, input.dim(), normalized_shape),
         {{kGradOutput, grad_output},
          {kInput, input},
          {kMean, mean},
          {kRstd, rstd},
          {kWeight, value_or_undefined(weight)},
          {kOther, value_or_undefined(bias)}},
         output_mask,
         {grad_input, grad_weight, grad_bias}},
        recording);
  }
  return outputs;
}

std::tuple<Tensor, Tensor> rms_norm_backward_autograd(
    const Tensor& grad_output,
    const Tensor& input,
    c10::SymIntArrayRef normalized_shape,
    const Tensor& rstd,
    const OptionalTensor& weight,
    std::array<bool, 2> output_mask) {
  const Recording recording(grad_output, input, rstd, weight);
  auto outputs = call_below_autograd(
      ops().rms_norm_backward, grad_output, input, normalized_shape, rstd, weight, output_mask);
  if (recording.any()) {
    const auto& [grad_input, grad_weight] = outputs;
    record_backward(
        {"RmsNormBackwardBackward",
         row_norm(/*center=*/false, input.dim(), normalized_shape),
         {{kGradOutput, grad_output},
          {kInput, input},
          {kRstd, rstd},
          {kWeight, value_or_undefined(weight)}},
         {output_mask[0], output_mask[1], false},
         {grad_input, grad_weight}},
        recording);
  }
  return outputs;
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_autograd(
    const Tensor& grad_output,
    const Tensor& input,
    const OptionalTensor& weight,
    const OptionalTensor& bias,
    const Tensor& save_mean,
    const Tensor& save_rstd,
    bool training,
    std::array<bool, 3> output_mask) {
  const Recording recording(grad_output, input, weight, bias, save_mean, save_rstd);
  auto outputs = call_below_autograd(
      ops().batch_norm_backward, grad_output, input, weight, bias, save_mean, save_rstd, training,
      output_mask);
  if (recording.any()) {
    const auto& [grad_input, grad_weight, grad_bias] = outputs;
    record_backward(
        {"BatchNormBackwardBackward",
         {formulas::Groups::channels(input.dim()), /*center=*/true, /*batch_stats=*/training},
         {{kGradOutput, grad_output},
          {kInput, input},
          {kWeight, value_or_undefined(weight)},
          {kOther, value_or_undefined(bias)},
          {kMean, save_mean},
          {kRstd, save_rstd}},
         output_mask,
         {grad_input, grad_weight, grad_bias}},
        recording);
  }
  return outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(layernorm_ext, Autograd, m) {
  m.impl("layer_norm_backward", &layer_norm_backward_autograd);
  m.impl("rms_norm_backward", &rms_norm_backward_autograd);
  m.impl("batch_norm_backward", &batch_norm_backward_autograd);
}

}  // namespace layernorm_ext
