// How the ops of every backend hand their arguments to the kernels: the
// accumulation type, the dtype dispatch of kernels that read parameters in
// their own dtype, and optional tensors as pointers.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <type_traits>

namespace layernorm_ext {

// The type that sums and statistics are kept in: double for double, float
// for float, half and bfloat16.
template <typename T>
using acc_t = at::opmath_type<T>;

// Calls f(T*, P*) with null pointers whose types name the input scalar type T
// and the parameter scalar type P: P is T, or float for a half/bfloat16 input
// with float32 parameters (the mixed case torch allows). For kernels that
// read the parameters as they are (the CUDA row norms).
template <typename F>
void dispatch_input_and_param_types(at::ScalarType input, at::ScalarType param, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input, "layernorm_ext", [&] {
    if (param == input) {
      f(static_cast<scalar_t*>(nullptr), static_cast<scalar_t*>(nullptr));
    } else {
      if constexpr (!std::is_same_v<scalar_t, float> && !std::is_same_v<scalar_t, double>) {
        f(static_cast<scalar_t*>(nullptr), static_cast<float*>(nullptr));
      }
    }
  });
}

// Typed data pointer of an optional tensor, or nullptr when it is absent.
template <typename T, typename OptionalTensor>
const T* optional_data(const OptionalTensor& t) {
  return t.has_value() ? t->template const_data_ptr<T>() : nullptr;
}

// The same for tensors that are undefined when absent.
template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <typename T>
T* mutable_data_or_null(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

// The tensor made contiguous, or nullopt when it is absent.
template <typename OptionalTensor>
OptionalTensor optional_contiguous(const OptionalTensor& t) {
  return t.has_value() ? OptionalTensor(t->contiguous()) : OptionalTensor();
}

// The tensor as contiguous values of `dtype` (itself when it already is), or
// nullopt when it is absent.
template <typename OptionalTensor>
OptionalTensor optional_contiguous_as(const OptionalTensor& t, c10::ScalarType dtype) {
  return t.has_value() ? OptionalTensor(t->to(dtype).contiguous()) : OptionalTensor();
}

// An op's result that was not computed (undefined) as the [0]-shaped tensor
// the ops return for it.
inline at::Tensor or_empty(const at::Tensor& t, const at::TensorOptions& options) {
  return t.defined() ? t : at::empty({0}, options);
}

} // namespace layernorm_ext
