// Autograd kernels of every op, one registration for every backend
// (DispatchKey Autograd), written the way torch's generated VariableType
// kernels are: the op runs below autograd, then
//  - reverse mode: a Node (our own subclass, not a torch::autograd::Function)
//    becomes the outputs' grad_fn, saving what its backward needs;
//  - forward mode: when an argument carries a tangent (forward-mode AD,
//    torch.func.jvp/jacfwd), the outputs get theirs from the formulas in
//    autograd_formulas.h.
// This is what torch.func's transforms need: they run autograd kernels on
// their wrapped tensors level by level, which works for Nodes recorded this
// way and refuses C++ autograd::Functions; vmap's batching rules are
// registered from Python (layernorm_ext/_vmap.py). Under compiled autograd
// each Node's backward is one call in the graph (compiled_autograd_calls.h).
//
// The forward ops' Nodes call the backward ops (the fast kernels), plus the
// input's gradient through the returned statistics; the backward ops' Nodes
// (double backward) and every tangent use differentiable ATen formulas, so
// that derivatives of any order exist. When nothing is recorded and no
// argument has a tangent (torch.no_grad, inference, a backward without
// create_graph), a kernel costs one check before calling the op below
// autograd: the reason it is C++ (an autograd kernel registered from Python
// costs microseconds on every call, most of the time of a small norm).
//
// normalized_shape is SymInt[] in the schemas, and these kernels take and pass
// it on as SymInts: under torch.compile(dynamic=True) and opcheck's
// aot_dispatch_dynamic test the sizes are symbolic.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <array>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "autograd_formulas.h"
#include "compiled_autograd_calls.h"

namespace layernorm_ext {
namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;
using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
using torch::dynamo::autograd::CompiledNodeArgs;
using torch::dynamo::autograd::SwapSavedVariables;
using compiled_autograd_calls::call_in_graph;
using compiled_autograd_calls::collect_fields;
using compiled_autograd_calls::pack_fields;
using compiled_autograd_calls::unpack_fields;
using compiled_autograd_calls::wanted_edges;
using compiled_autograd_calls::zeros_for_undefined;
using Tensors2 = std::tuple<Tensor, Tensor>;
using Tensors3 = std::tuple<Tensor, Tensor, Tensor>;
using Tensors4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using Tensors5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
namespace formulas = autograd_formulas;
using formulas::add_defined;

// The ops' C++ signatures (csrc/ops.cpp has their schemas), with SymInt sizes.
using LayerNormForward = Tensors3(
    const Tensor&, c10::SymIntArrayRef, const OptionalTensor&, const OptionalTensor&, double);
using LayerNormBackward = Tensors3(
    const Tensor&, const Tensor&, c10::SymIntArrayRef, const Tensor&, const Tensor&,
    const OptionalTensor&, const OptionalTensor&, std::array<bool, 3>);
using RmsNormForward = Tensors2(const Tensor&, c10::SymIntArrayRef, const OptionalTensor&, double);
using RmsNormBackward = Tensors2(
    const Tensor&, const Tensor&, c10::SymIntArrayRef, const Tensor&, const OptionalTensor&,
    std::array<bool, 2>);
using FusedAddLayerNormForward = Tensors4(
    const Tensor&, const Tensor&, c10::SymIntArrayRef, const OptionalTensor&,
    const OptionalTensor&, double);
using FusedAddRmsNormForward = Tensors3(
    const Tensor&, const Tensor&, c10::SymIntArrayRef, const OptionalTensor&, double);
using BatchNormForward = Tensors5(
    const Tensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
    const OptionalTensor&, bool, double, double);
using BatchNormBackward = Tensors3(
    const Tensor&, const Tensor&, const OptionalTensor&, const OptionalTensor&, const Tensor&,
    const Tensor&, bool, std::array<bool, 3>);

template <class Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// The ops' dispatcher handles, looked up on the first call (ops.cpp has
// defined the schemas by then).
struct Ops {
  c10::TypedOperatorHandle<LayerNormForward> layer_norm_forward =
      find_op<LayerNormForward>("layernorm_ext::layer_norm_forward");
  c10::TypedOperatorHandle<LayerNormBackward> layer_norm_backward =
      find_op<LayerNormBackward>("layernorm_ext::layer_norm_backward");
  c10::TypedOperatorHandle<RmsNormForward> rms_norm_forward =
      find_op<RmsNormForward>("layernorm_ext::rms_norm_forward");
  c10::TypedOperatorHandle<RmsNormBackward> rms_norm_backward =
      find_op<RmsNormBackward>("layernorm_ext::rms_norm_backward");
  c10::TypedOperatorHandle<FusedAddLayerNormForward> fused_add_layer_norm_forward =
      find_op<FusedAddLayerNormForward>("layernorm_ext::fused_add_layer_norm_forward");
  c10::TypedOperatorHandle<FusedAddRmsNormForward> fused_add_rms_norm_forward =
      find_op<FusedAddRmsNormForward>("layernorm_ext::fused_add_rms_norm_forward");
  c10::TypedOperatorHandle<BatchNormForward> batch_norm_forward =
      find_op<BatchNormForward>("layernorm_ext::batch_norm_forward");
  c10::TypedOperatorHandle<BatchNormBackward> batch_norm_backward =
      find_op<BatchNormBackward>("layernorm_ext::batch_norm_backward");
};

const Ops& ops() {
  static const Ops handles;
  return handles;
}

// Calls an op's kernel for the backend, skipping the autograd keys (ours
// included).
template <class Signature, class... Args>
auto call_below_autograd(const c10::TypedOperatorHandle<Signature>& op, Args&&... args) {
  const at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(std::forward<Args>(args)...);
}

// ---- What to record ----------------------------------------------------------

Tensor tangent_of(const Tensor& t) {
  return t.defined() ? t._fw_grad(/*level=*/0) : Tensor();
}

Tensor tangent_of(const OptionalTensor& t) {
  return t.has_value() ? tangent_of(*t) : Tensor();
}

// The primal of a dual tensor (itself otherwise): a formula computing a
// tangent must not see the tangent of its inputs at the same level.
Tensor primal_of(const Tensor& t) {
  return tangent_of(t).defined() ? t._fw_primal(/*level=*/0) : t;
}

Tensor primal_of(const OptionalTensor& t) {
  return t.has_value() ? primal_of(*t) : Tensor();
}

// What a call must record: reverse mode when grad mode is on and an argument
// requires grad, forward mode when an argument has a tangent.
struct Recording {
  template <class... Args>
  explicit Recording(const Args&... tensors)
      : reverse(torch::autograd::compute_requires_grad(tensors...)),
        forward((tangent_of(tensors).defined() || ...)) {}

  bool any() const { return reverse || forward; }

  bool reverse, forward;
};

// Calls an op through its autograd kernel when that must record, else below
// it.
template <class Signature, class... Args>
auto call_op(const c10::TypedOperatorHandle<Signature>& op, bool record, Args&&... args) {
  if (record) return op.call(std::forward<Args>(args)...);
  return call_below_autograd(op, std::forward<Args>(args)...);
}

// Recent torch releases hold Nodes by intrusive_ptr, earlier ones by
// shared_ptr: whichever this torch's Node::getptr returns.
using NodePtr = decltype(std::declval<Node&>().getptr());

template <class T, class Ptr = NodePtr>
Ptr make_node() {
  if constexpr (std::is_same_v<Ptr, std::shared_ptr<Node>>) {
    return std::make_shared<T>();
  } else {
    return c10::make_intrusive<T>();
  }
}

OptionalTensor optional_if_defined(const Tensor& t) {
  return t.defined() ? OptionalTensor(t) : std::nullopt;
}

// The backward ops return [0]-shaped tensors for the gradients not asked
// for; autograd wants undefined ones.
template <size_t N>
void keep_masked(std::array<Tensor, N>& grads, const std::array<bool, N>& mask) {
  for (size_t i = 0; i < N; ++i) {
    if (!mask[i]) grads[i] = Tensor();
  }
}

void set_tangent(const Tensor& output, const Tensor& tangent) {
  if (tangent.defined()) output._set_fw_grad(tangent, /*level=*/0, /*is_inplace_op=*/false);
}

// ---- Forward ops -----------------------------------------------------------

enum class NormKind { kLayerNorm, kRmsNorm, kBatchNorm };

// What a forward op's backward computes with, besides its saved tensors: the
// kind of norm, whether it was fused with the residual add (the normalized
// tensor is then the returned sum), normalized_shape (row norms), and which
// output each incoming gradient is of (-1: none).
struct ForwardBackwardConfig {
  NormKind kind = NormKind::kLayerNorm;
  formulas::Norm norm;
  bool fused = false;
  std::vector<c10::SymInt> normalized_shape;
  int sum_slot = -1, mean_slot = -1, rstd_slot = -1;
};

// The saved tensors (undefined when absent).
struct ForwardSaved {
  Tensor normalized, weight, bias, mean, rstd;
};

// The gradients of a forward op's arguments (input, [residual], weight,
// bias), from those of its outputs with history, in order: the backward op
// for grad_output, plus the input's path through the returned statistics;
// the fused ops' residual gets the same gradient as their input. `wanted`
// says which arguments' gradients to compute.
variable_list forward_op_gradients(
    const ForwardBackwardConfig& config,
    const ForwardSaved& saved,
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

// Calls f on every field of a forward op's backward config, in one order.
template <class Config, class F>
void config_fields(Config& c, F&& f) {
  auto& groups = c.norm.groups;
  f(c.kind, groups.group_dims, groups.param_dims, groups.stat_unit_dims, groups.per_channel,
    c.norm.center, c.norm.batch_stats, c.fused, c.normalized_shape, c.sum_slot, c.mean_slot,
    c.rstd_slot);
}

// The packed arguments: the config, the saved tensors, the wanted edges.
template <class Config, class Saved, class Wanted, class F>
void forward_fields(Config& c, Saved& s, Wanted& wanted, F&& f) {
  config_fields(c, [&](auto&... config) {
    f(config..., s.normalized, s.weight, s.bias, s.mean, s.rstd, wanted);
  });
}

variable_list forward_op_gradients_packed(
    const variable_list& grads, const std::vector<c10::IValue>& args) {
  ForwardBackwardConfig config;
  ForwardSaved saved;
  std::vector<bool> wanted;
  forward_fields(config, saved, wanted, [&](auto&... fields) { unpack_fields(args, fields...); });
  std::vector<Tensor> edge_args{saved.normalized};
  if (config.fused) edge_args.push_back(saved.normalized);
  edge_args.push_back(saved.weight);
  edge_args.push_back(saved.bias);
  return zeros_for_undefined(
      forward_op_gradients(config, saved, grads, wanted), wanted, edge_args);
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
    return forward_op_gradients(config, unpack(), grads, wanted_edges(*this, false));
  }

  void compiled_args(CompiledNodeArgs& args) const override {
    // The outputs among the saved tensors are saved as outputs.
    args.collect(normalized_, /*is_output=*/config.fused);
    args.collect(weight_, false);
    args.collect(bias_, false);
    args.collect(mean_, true);
    args.collect(rstd_, true);
    config_fields(config, [&](const auto&... fields) { collect_fields(args, fields...); });
  }

  variable_list apply_with_saved(const variable_list& grads, SwapSavedVariables& swap) override {
    swap.before(config.normalized_shape);
    for (auto* v : saved_variables(*this)) swap.before(*v);
    auto saved = unpack();
    auto wanted = wanted_edges(*this, true);
    std::vector<c10::IValue> args;
    forward_fields(config, saved, wanted, [&](const auto&... fields) { args = pack_fields(fields...); });
    auto result = call_in_graph(*this, swap, forward_op_gradients_packed, grads, args);
    for (auto* v : saved_variables(*this)) swap.after(*v);
    swap.after(config.normalized_shape);
    return result;
  }

  ForwardSaved unpack() {
    const auto self = getptr();
    return {normalized_.unpack(config.fused ? self : nullptr), weight_.unpack(), bias_.unpack(),
            mean_.unpack(self), rstd_.unpack(self)};
  }

  ForwardBackwardConfig config;
  SavedVariable normalized_, weight_, bias_, mean_, rstd_;
};

// What a forward op call is: its kind, the normalized tensor (the input, or
// the returned sum of the fused ops) and what it was called with and returned.
struct ForwardCall {
  NormKind kind;
  formulas::Norm norm;
  std::vector<Tensor> addends;  // input, [residual]
  c10::SymIntArrayRef normalized_shape;
  OptionalTensor weight, bias;
  Tensor output, sum, mean, rstd;  // sum undefined unless fused, mean for RMSNorm
};

void record_forward(const ForwardCall& call, const Recording& recording) {
  const bool fused = call.addends.size() == 2;
  const auto& input = call.addends[0];
  NormForwardNode* node = nullptr;
  if (recording.reverse) {
    auto owner = make_node<NormForwardNode>();
    node = static_cast<NormForwardNode*>(owner.get());
    auto& config = node->config;
    config.kind = call.kind;
    config.norm = call.norm;
    config.fused = fused;
    config.normalized_shape = call.normalized_shape.vec();
    const Tensor residual = fused ? call.addends[1] : Tensor();
    node->set_next_edges(
        fused ? torch::autograd::collect_next_edges(input, residual, call.weight, call.bias)
              : torch::autograd::collect_next_edges(input, call.weight, call.bias));
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
    const auto d_normalized =
        fused ? add_defined(tangent_of(input), tangent_of(call.addends[1])) : tangent_of(input);
    const auto tangents = formulas::forward_tangents(
        call.norm, fused ? call.sum : primal_of(input), call.mean, call.rstd,
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
    node->normalized_ = SavedVariable(fused ? call.sum : input, /*is_output=*/fused);
    node->weight_ = SavedVariable(call.weight, false);
    node->bias_ = SavedVariable(call.bias, false);
    if (call.mean.defined()) node->mean_ = SavedVariable(call.mean, true);
    node->rstd_ = SavedVariable(call.rstd, true);
  }
}

formulas::Norm row_norm(bool center, int64_t dim, c10::SymIntArrayRef normalized_shape) {
  return {formulas::Groups::rows(dim, static_cast<int64_t>(normalized_shape.size())), center,
          /*batch_stats=*/true};
}

Tensors3 layer_norm_forward_autograd(
    const Tensor& input,
    c10::SymIntArrayRef normalized_shape,
    const OptionalTensor& weight,
    const OptionalTensor& bias,
    double eps) {
  const Recording recording(input, weight, bias);
  auto outputs =
      call_below_autograd(ops().layer_norm_forward, input, normalized_shape, weight, bias, eps);
  if (recording.any()) {
    const auto& [output, mean, rstd] = outputs;
    record_forward(
        {NormKind::kLayerNorm, row_norm(true, input.dim(), normalized_shape), {input},
         normalized_shape, weight, bias, output, Tensor(), mean, rstd},
        recording);
  }
  return outputs;
}

Tensors2 rms_norm_forward_autograd(
    const Tensor& input,
    c10::SymIntArrayRef normalized_shape,
    const OptionalTensor& weight,
    double eps) {
  const Recording recording(input, weight);
  auto outputs = call_below_autograd(ops().rms_norm_forward, input, normalized_shape, weight, eps);
  if (recording.any()) {
    const auto& [output, rstd] = outputs;
    record_forward(
        {NormKind::kRmsNorm, row_norm(false, input.dim(), normalized_shape), {input},
         normalized_shape, weight, std::nullopt, output, Tensor(), Tensor(), rstd},
        recording);
  }
  return outputs;
}

Tensors4 fused_add_layer_norm_forward_autograd(
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
    const auto& [output, sum, mean, rstd] = outputs;
    record_forward(
        {NormKind::kLayerNorm, row_norm(true, input.dim(), normalized_shape), {input, residual},
         normalized_shape, weight, bias, output, sum, mean, rstd},
        recording);
  }
  return outputs;
}

Tensors3 fused_add_rms_norm_forward_autograd(
    const Tensor& input,
    const Tensor& residual,
    c10::SymIntArrayRef normalized_shape,
    const OptionalTensor& weight,
    double eps) {
  const Recording recording(input, residual, weight);
  auto outputs = call_below_autograd(
      ops().fused_add_rms_norm_forward, input, residual, normalized_shape, weight, eps);
  if (recording.any()) {
    const auto& [output, sum, rstd] = outputs;
    record_forward(
        {NormKind::kRmsNorm, row_norm(false, input.dim(), normalized_shape), {input, residual},
         normalized_shape, weight, std::nullopt, output, sum, Tensor(), rstd},
        recording);
  }
  return outputs;
}

// The running statistics are state that the wrapper copies into the buffers,
// not something to differentiate (nor are torch's): they get no history and
// no tangent.
Tensors5 batch_norm_forward_autograd(
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
    const auto& [output, save_mean, save_rstd, new_running_mean, new_running_var] = outputs;
    record_forward(
        {NormKind::kBatchNorm,
         {formulas::Groups::channels(input.dim()), /*center=*/true, /*batch_stats=*/training},
         {input}, {}, weight, bias, output, Tensor(), save_mean, save_rstd},
        recording);
  }
  return outputs;
}

// ---- Backward ops (double backward) ------------------------------------------

// What a backward op's backward computes with, besides its saved tensors:
// the norm, which outputs the op computed, and `slots`, the op's tensor
// argument (next edge) of each of the formula's gradients (grad_output,
// input, mean, rstd, weight; -1: not an argument, RMSNorm's mean). The bias
// argument only gives grad_bias its dtype and gets no gradient.
struct BackwardBackwardConfig {
  formulas::Norm norm;
  std::array<bool, 3> output_mask{};
  std::vector<int64_t> slots;
};

template <class Config, class F>
void backward_config_fields(Config& c, F&& f) {
  auto& groups = c.norm.groups;
  f(groups.group_dims, groups.param_dims, groups.stat_unit_dims, groups.per_channel,
    c.norm.center, c.norm.batch_stats, c.output_mask, c.slots);
}

template <class Config, class Saved, class Wanted, class F>
void backward_fields(Config& c, Saved& s, Wanted& wanted, F&& f) {
  backward_config_fields(c, [&](auto&... config) {
    f(config..., s.grad_output, s.input, s.mean, s.rstd, s.weight, wanted);
  });
}

// The gradients of a backward op's tensor arguments from those of its outputs.
variable_list backward_op_gradients(
    const BackwardBackwardConfig& config,
    const formulas::BackwardInputs& saved,
    const variable_list& grads,
    const std::vector<bool>& wanted) {
  const auto incoming = [&](size_t i) {
    return i < grads.size() && config.output_mask[i] ? grads[i] : Tensor();
  };
  const auto gradients =
      formulas::backward_gradients(config.norm, saved, incoming(0), incoming(1), incoming(2));
  variable_list out(wanted.size());
  for (size_t i = 0; i < config.slots.size(); ++i) {
    const auto slot = config.slots[i];
    if (slot >= 0 && wanted[slot]) out[slot] = gradients[i];
  }
  return out;
}

variable_list backward_op_gradients_packed(
    const variable_list& grads, const std::vector<c10::IValue>& args) {
  BackwardBackwardConfig config;
  formulas::BackwardInputs saved;
  std::vector<bool> wanted;
  backward_fields(config, saved, wanted, [&](auto&... fields) { unpack_fields(args, fields...); });
  const std::array<Tensor, 5> by_slot{
      saved.grad_output, saved.input, saved.mean, saved.rstd, saved.weight};
  std::vector<Tensor> edge_args(wanted.size());
  for (size_t i = 0; i < config.slots.size(); ++i) {
    if (config.slots[i] >= 0) edge_args[config.slots[i]] = by_slot[i];
  }
  return zeros_for_undefined(
      backward_op_gradients(config, saved, grads, wanted), wanted, edge_args);
}

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
    return backward_op_gradients(config, unpack(), grads, wanted_edges(*this, false));
  }

  void compiled_args(CompiledNodeArgs& args) const override {
    for (const auto* v : saved_variables(*this)) args.collect(*v, false);
    backward_config_fields(config, [&](const auto&... fields) { collect_fields(args, fields...); });
  }

  variable_list apply_with_saved(const variable_list& grads, SwapSavedVariables& swap) override {
    for (auto* v : saved_variables(*this)) swap.before(*v);
    auto saved = unpack();
    auto wanted = wanted_edges(*this, true);
    std::vector<c10::IValue> args;
    backward_fields(config, saved, wanted, [&](const auto&... fields) { args = pack_fields(fields...); });
    auto result = call_in_graph(*this, swap, backward_op_gradients_packed, grads, args);
    for (auto* v : saved_variables(*this)) swap.after(*v);
    return result;
  }

  formulas::BackwardInputs unpack() const {
    return {grad_output_.unpack(), input_.unpack(), mean_.unpack(), rstd_.unpack(),
            weight_.unpack()};
  }

  std::string name_;
  BackwardBackwardConfig config;
  SavedVariable grad_output_, input_, mean_, rstd_, weight_;
};

// What a backward op call is: its arguments in the formula's terms, the
// bias (grad_bias's dtype), the edges of its tensor arguments and its outputs.
struct BackwardCall {
  std::string name;
  formulas::Norm norm;
  formulas::BackwardInputs args;
  OptionalTensor bias;
  torch::autograd::edge_list edges;
  std::vector<int64_t> slots;
  std::array<bool, 3> output_mask;
  std::vector<Tensor> outputs;
};

void record_backward(BackwardCall call, const Recording& recording) {
  const auto& a = call.args;
  if (recording.reverse) {
    auto node = make_node<NormBackwardNode>();
    auto* n = static_cast<NormBackwardNode*>(node.get());
    n->name_ = std::move(call.name);
    n->config = {call.norm, call.output_mask, call.slots};
    n->set_next_edges(std::move(call.edges));
    torch::autograd::set_history(call.outputs, node);
    n->grad_output_ = SavedVariable(a.grad_output, false);
    n->input_ = SavedVariable(a.input, false);
    n->mean_ = SavedVariable(a.mean, false);
    n->rstd_ = SavedVariable(a.rstd, false);
    n->weight_ = SavedVariable(a.weight, false);
  }
  if (recording.forward) {
    const formulas::BackwardInputs primals{
        primal_of(a.grad_output), primal_of(a.input), primal_of(a.mean), primal_of(a.rstd),
        primal_of(a.weight)};
    const formulas::BackwardInputs tangents{
        tangent_of(a.grad_output), tangent_of(a.input), tangent_of(a.mean), tangent_of(a.rstd),
        tangent_of(a.weight)};
    const auto out = formulas::backward_tangents(
        call.norm, primals, call.bias.value_or(Tensor()), tangents, call.output_mask);
    for (size_t i = 0; i < call.outputs.size(); ++i) set_tangent(call.outputs[i], out[i]);
  }
}

Tensors3 layer_norm_backward_autograd(
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
         row_norm(true, input.dim(), normalized_shape),
         {grad_output, input, mean, rstd, weight.value_or(Tensor())},
         bias,
         torch::autograd::collect_next_edges(grad_output, input, mean, rstd, weight, Tensor()),
         {0, 1, 2, 3, 4},
         output_mask,
         {grad_input, grad_weight, grad_bias}},
        recording);
  }
  return outputs;
}

Tensors2 rms_norm_backward_autograd(
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
         row_norm(false, input.dim(), normalized_shape),
         {grad_output, input, Tensor(), rstd, weight.value_or(Tensor())},
         std::nullopt,
         torch::autograd::collect_next_edges(grad_output, input, rstd, weight),
         {0, 1, -1, 2, 3},
         {output_mask[0], output_mask[1], false},
         {grad_input, grad_weight}},
        recording);
  }
  return outputs;
}

Tensors3 batch_norm_backward_autograd(
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
         {grad_output, input, save_mean, save_rstd, weight.value_or(Tensor())},
         bias,
         torch::autograd::collect_next_edges(
             grad_output, input, weight, Tensor(), save_mean, save_rstd),
         {0, 1, 4, 5, 2},
         output_mask,
         {grad_input, grad_weight, grad_bias}},
        recording);
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
  m.impl("layer_norm_backward", &layer_norm_backward_autograd);
  m.impl("rms_norm_backward", &rms_norm_backward_autograd);
  m.impl("batch_norm_backward", &batch_norm_backward_autograd);
}

}  // namespace layernorm_ext
