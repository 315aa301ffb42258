// Dtype dispatch for the CPU kernels: one template instantiation per
// (input dtype, parameter dtype) pair that torch accepts, so that one kernel
// template serves every dtype.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <type_traits>

namespace layernorm_ext::cpu {

// The type that sums and statistics are kept in: double for double, float
// for float, half and bfloat16.
template <typename T>
using acc_t = at::opmath_type<T>;

// Calls f(T*, W*) with null pointers whose types name the input scalar type T
// and the parameter scalar type W: W is T, or float for a half/bfloat16 input
// with float32 weight and bias (the mixed case torch allows).
template <typename F>
void dispatch_input_and_param_types(
    at::ScalarType input, at::ScalarType param, F&& f) {
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

} // namespace layernorm_ext::cpu
