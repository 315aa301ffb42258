// Helpers shared by the torch glue of the CUDA ops (*_cuda.cpp): the CUDA
// type of each torch scalar type, and the device guard / stream / error check
// / registration every op runs its launches under.
#pragma once

#include "../op_arguments.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <optional>

#ifdef LAYERNORM_EXT_CUDA_EMULATOR
// The same glue bound to CPU tensors through the tests' CPU executor
// (tests/cuda_emulator): its ops live in a test-only namespace, tensors stay
// on the CPU, and a failed launch reports what the executor found.
#define LAYERNORM_EXT_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(layernorm_ext_cuda_emulated, CPU, m)
#define LAYERNORM_EXT_CUDA_CHECK(expr)                                                      \
  do {                                                                                      \
    const cudaError_t layernorm_ext_err = (expr);                                           \
    TORCH_CHECK(layernorm_ext_err == cudaSuccess, "CUDA executor: ",                        \
                cudaGetErrorString(layernorm_ext_err), ": ", cuda_emulator::last_failure()); \
  } while (false)
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#define LAYERNORM_EXT_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(layernorm_ext, CUDA, m)
#define LAYERNORM_EXT_CUDA_CHECK(expr) C10_CUDA_CHECK(expr)
#endif

namespace layernorm_ext::cuda {

// at::Half and at::BFloat16 have the layout of __half and __nv_bfloat16, so
// tensor data is handed to the kernels through reinterpret_cast.
template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};
template <typename T>
using cuda_t = typename CudaType<T>::type;

template <typename T>
const cuda_t<T>* cuda_data(const at::Tensor& t) {
  return reinterpret_cast<const cuda_t<T>*>(t.const_data_ptr<T>());
}

template <typename T>
cuda_t<T>* cuda_mutable_data(const at::Tensor& t) {
  return reinterpret_cast<cuda_t<T>*>(t.mutable_data_ptr<T>());
}

// Typed device pointer of an optional tensor, or nullptr when it is absent.
template <typename T>
const cuda_t<T>* optional_cuda_data(const std::optional<at::Tensor>& t) {
  return reinterpret_cast<const cuda_t<T>*>(optional_data<T>(t));
}

// The same for tensors that are undefined when absent.
template <typename T>
const cuda_t<T>* cuda_data_or_null(const at::Tensor& t) {
  return reinterpret_cast<const cuda_t<T>*>(data_or_null<T>(t));
}

template <typename T>
cuda_t<T>* cuda_mutable_data_or_null(const at::Tensor& t) {
  return reinterpret_cast<cuda_t<T>*>(mutable_data_or_null<T>(t));
}

#ifdef LAYERNORM_EXT_CUDA_EMULATOR
// One device, one stream.
struct DeviceGuard {
  explicit DeviceGuard(const c10::Device&) {}
};
inline cudaStream_t current_stream() {
  return nullptr;
}
#else
// Makes the input's device current for the op's launches.
using DeviceGuard = c10::cuda::CUDAGuard;

// The stream the current (guarded) device's kernels run on.
inline cudaStream_t current_stream() {
  return c10::cuda::getCurrentCUDAStream().stream();
}
#endif

} // namespace layernorm_ext::cuda
