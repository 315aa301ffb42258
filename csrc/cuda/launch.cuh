// The two CUDA spellings that host C++ has no syntax for, written once: the
// kernel launch (<<<grid, block, shared bytes, stream>>>) and the dynamic
// shared memory of a launch (an extern __shared__ array). Every kernel of
// csrc/cuda reaches them only through `launch` and `dynamic_shared_memory`,
// so that the same sources also run on the CPU executor of the tests
// (tests/cuda_emulator), which defines both for its fibers when the build
// sets LAYERNORM_EXT_CUDA_EMULATOR.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <utility>

namespace layernorm_ext::cuda {

#ifdef LAYERNORM_EXT_CUDA_EMULATOR
using cuda_emulator::dynamic_shared_memory;
using cuda_emulator::launch;
#else
// Launches kernel(args...) on `stream` and returns the launch's error code
// (the arguments convert to the kernel's parameter types as in <<<>>>).
template <typename... Params, typename... Args>
cudaError_t launch(
    void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
    Args&&... args) {
  kernel<<<grid, block, shared_bytes, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
}

// The launch's dynamic shared memory, 16-byte aligned.
template <typename T>
__device__ __forceinline__ T* dynamic_shared_memory() {
  extern __shared__ __align__(16) unsigned char dynamic_shared_bytes[];
  return reinterpret_cast<T*>(dynamic_shared_bytes);
}
#endif

} // namespace layernorm_ext::cuda
