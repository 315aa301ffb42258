// What the autograd kernels of every op (autograd_forward_ops.cpp,
// autograd_backward_ops.cpp) share: deciding what a call records, calling
// the op below autograd, and the tensors' tangents and primals.
//
// The kernels are written the way torch's generated VariableType kernels
// are: the op runs below autograd, then
//  - reverse mode: a Node (our own subclass, not a torch::autograd::Function)
//    becomes the outputs' grad_fn, saving what its backward needs;
//  - forward mode: when an argument carries a tangent (forward-mode AD,
//    torch.func.jvp/jacfwd), the outputs get theirs from the formulas in
//    autograd_formulas.h.
// This is what torch.func's transforms need: they run autograd kernels on
// their wrapped tensors level by level, which works for Nodes recorded this
// way and refuses C++ autograd::Functions; vmap's batching rules are
// registered from Python (layernorm_ext/_vmap.py). When nothing is recorded
// and no argument has a tangent (torch.no_grad, inference, a backward without
// create_graph), a kernel costs one check before calling the op below
// autograd: the reason it is C++ (an autograd kernel registered from Python
// costs microseconds on every call, most of the time of a small norm).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>

#include <array>
#include <memory>
#include <optional>
#include <type_traits>
#include <utility>

namespace layernorm_ext::autograd_recording {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

// Calls an op's kernel for the backend, skipping the autograd keys (ours
// included).
template <class Signature, class... Args>
auto call_below_autograd(const c10::TypedOperatorHandle<Signature>& op, Args&&... args) {
  const at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(std::forward<Args>(args)...);
}

inline Tensor tangent_of(const Tensor& t) {
  return t.defined() ? t._fw_grad(/*level=*/0) : Tensor();
}

inline Tensor tangent_of(const OptionalTensor& t) {
  return t.has_value() ? tangent_of(*t) : Tensor();
}

// The primal of a dual tensor (itself otherwise): a formula computing a
// tangent must not see the tangent of its inputs at the same level.
inline Tensor primal_of(const Tensor& t) {
  return tangent_of(t).defined() ? t._fw_primal(/*level=*/0) : t;
}

inline Tensor primal_of(const OptionalTensor& t) {
  return t.has_value() ? primal_of(*t) : Tensor();
}

inline void set_tangent(const Tensor& output, const Tensor& tangent) {
  if (tangent.defined()) output._set_fw_grad(tangent, /*level=*/0, /*is_inplace_op=*/false);
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
using NodePtr = decltype(std::declval<torch::autograd::Node&>().getptr());

template <class T, class Ptr = NodePtr>
Ptr make_node() {
  if constexpr (std::is_same_v<Ptr, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<T>();
  } else {
    return c10::make_intrusive<T>();
  }
}

inline OptionalTensor optional_if_defined(const Tensor& t) {
  return t.defined() ? OptionalTensor(t) : std::nullopt;
}

}  // namespace layernorm_ext::autograd_recording
