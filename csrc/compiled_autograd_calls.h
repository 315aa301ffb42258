// Compiled autograd support for the Nodes of autograd_forward_ops.cpp and
// autograd_backward_ops.cpp.
//
// torch._dynamo's compiled autograd calls a Node's backward as one function
// of its incoming gradients and packed arguments: the saved tensors (swapped
// for the graph's) and every field that shapes the computation, on which it
// also keys its cache. Each Node's backward is described by a struct
// (`Backward` below) that lists its fields once, in one order, for the cache
// key (collect_fields), packing (pack_fields) and unpacking (unpack_fields);
// call_packed_in_graph puts the call into the graph.
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/dynamo/compiled_autograd.h>

#include <atomic>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace layernorm_ext::compiled_autograd_calls {

using at::Tensor;
using torch::autograd::Node;
using torch::autograd::variable_list;
using torch::dynamo::autograd::CompiledNodeArgs;
using torch::dynamo::autograd::SwapSavedVariables;

// Fields as compiled autograd packs them: integers as int64, tensors as
// optional ones (an absent parameter is an undefined tensor).
template <class T>
using Packed = std::conditional_t<
    std::is_same_v<T, Tensor>, std::optional<Tensor>,
    std::conditional_t<std::is_enum_v<T> || std::is_same_v<T, int>, int64_t, T>>;

template <class T>
T from_packed(Packed<T> value) {
  if constexpr (std::is_same_v<T, Tensor>) {
    return value.value_or(Tensor());
  } else {
    return static_cast<T>(std::move(value));
  }
}

template <class... Fields>
void collect_fields(CompiledNodeArgs& args, const Fields&... fields) {
  (args.collect(static_cast<Packed<Fields>>(fields)), ...);
}

template <class... Fields>
std::vector<c10::IValue> pack_fields(const Fields&... fields) {
  torch::dynamo::autograd::PackedArgs packed;
  (packed.pack(static_cast<Packed<Fields>>(fields)), ...);
  return std::move(packed).vec();
}

template <class... Fields>
void unpack_fields(const std::vector<c10::IValue>& args, Fields&... fields) {
  torch::dynamo::autograd::PackedArgs packed(args);
  ((fields = from_packed<Fields>(packed.unpack<Packed<Fields>>())), ...);
}

// Puts the call of `backward` on `args` (packed fields) into the graph.
inline variable_list call_in_graph(
    const Node& node,
    SwapSavedVariables& swap,
    torch::autograd::functional_apply_t backward,
    const variable_list& grads,
    const std::vector<c10::IValue>& args) {
  std::vector<at::TypePtr> schema;
  for (const auto& arg : args) {
    schema.push_back(arg.isTensor() ? at::TensorType::get() : arg.type());
  }
  // Each binding needs a name of its own: a graph may hold several such
  // nodes, and every compile binds anew.
  static std::atomic<uint64_t> bindings{0};
  const auto& compiler = torch::dynamo::autograd::getPyCompilerInterface();
  const auto name = compiler->bind_function(
      swap.get_py_compiler(), node.name() + std::to_string(bindings++), std::move(backward),
      schema);
  return compiler->call_function(
      swap.get_py_compiler(), "apply_functional", name, grads, args,
      torch::dynamo::autograd::IValuePacker<
          std::vector<std::optional<torch::autograd::InputMetadata>>>::
          pack(torch::dynamo::autograd::get_input_metadata(node.next_edges())));
}

// A compiled graph cannot skip an undefined gradient the way the engine does:
// the wanted ones are zeros there, like the argument they are of.
inline variable_list zeros_for_undefined(
    variable_list grads, const std::vector<bool>& wanted, const std::vector<Tensor>& args) {
  for (size_t i = 0; i < grads.size(); ++i) {
    if (wanted[i] && !grads[i].defined()) grads[i] = at::zeros_like(args[i]);
  }
  return grads;
}

// Which of a Node's next edges want a gradient: while the graph is built, or
// in the running backward.
inline std::vector<bool> wanted_edges(const Node& node, bool in_task) {
  std::vector<bool> wanted(node.num_outputs());
  for (size_t i = 0; i < wanted.size(); ++i) {
    wanted[i] = in_task ? node.task_should_compute_output(i) : node.should_compute_output(i);
  }
  return wanted;
}

// A Node's backward, described by `Backward`:
//   Backward::Config, Backward::Saved: what it computes with, besides the
//     incoming gradients (fields, and the saved tensors);
//   Backward::config_fields(config, f), Backward::saved_fields(saved, f):
//     call f on every field, in one order;
//   Backward::gradients(config, saved, grads, wanted): the gradients of the
//     Node's next edges;
//   Backward::edge_arguments(config, saved, edges): the tensor each next edge
//     is of.
template <class Backward, class Config, class Saved, class Wanted, class F>
void all_fields(Config& config, Saved& saved, Wanted& wanted, F&& f) {
  Backward::config_fields(config, [&](auto&... config_fields) {
    Backward::saved_fields(saved, [&](auto&... saved_fields) {
      f(config_fields..., saved_fields..., wanted);
    });
  });
}

// The function the graph calls: the packed fields unpacked, then the Node's
// backward.
template <class Backward>
variable_list packed_gradients(const variable_list& grads, const std::vector<c10::IValue>& args) {
  typename Backward::Config config;
  typename Backward::Saved saved;
  std::vector<bool> wanted;
  all_fields<Backward>(config, saved, wanted, [&](auto&... fields) { unpack_fields(args, fields...); });
  return zeros_for_undefined(
      Backward::gradients(config, saved, grads, wanted), wanted,
      Backward::edge_arguments(config, saved, wanted.size()));
}

// A Node's apply_with_saved, once its saved variables are swapped for the
// graph's and unpacked into `saved`.
template <class Backward>
variable_list call_packed_in_graph(
    const Node& node,
    SwapSavedVariables& swap,
    const typename Backward::Config& config,
    const typename Backward::Saved& saved,
    const variable_list& grads) {
  const auto wanted = wanted_edges(node, true);
  std::vector<c10::IValue> args;
  all_fields<Backward>(config, saved, wanted, [&](const auto&... fields) { args = pack_fields(fields...); });
  return call_in_graph(node, swap, packed_gradients<Backward>, grads, args);
}

}  // namespace layernorm_ext::compiled_autograd_calls
