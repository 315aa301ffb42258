// The accumulation type of each CUDA storage type, in a header that host-only
// code (the torch glue, compiled by the host compiler) can include too.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace layernorm_ext::cuda {

// Sums and statistics are kept in double for double input, else in float.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

} // namespace layernorm_ext::cuda
