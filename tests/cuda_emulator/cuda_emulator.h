// A CPU executor for the CUDA kernels of csrc/cuda, for the tests only (it
// ships in no wheel). Force-included (-include cuda_emulator.h) ahead of every
// source of the emulated build, with LAYERNORM_EXT_CUDA_EMULATOR defined, so
// that the kernel sources compile unchanged with the host C++ compiler:
//  - the toolkit's own headers give the types (dim3, cudaError_t, __half,
//    __nv_bfloat16 and their host conversions); the execution space
//    specifiers become plain C++, and __shared__ variables are per-OS-thread
//    statics, which every fiber of a block (all on one OS thread) shares;
//  - a launch runs its blocks on OpenMP threads, and each block's threads as
//    cooperative fibers, 32 to a warp: __syncthreads, __syncwarp, the
//    shuffles and the votes switch fibers, and the block's scheduler releases
//    a barrier or a warp collective once every thread it names has arrived.
// It is stricter than a GPU where a GPU is undefined, and fails the launch
// (cudaErrorLaunchFailure, with a message from last_failure()) when:
//  - a __syncthreads is not reached by every live thread of the block (a
//    divergent barrier, or a thread that returned);
//  - a warp collective's mask names a lane that does not take part (returned,
//    at a barrier, at another collective), or the calling lane itself is not
//    in its mask, or a shuffle reads a lane outside the mask;
//  - dynamic shared memory is read or written past the launch's size (a
//    guard page, or AddressSanitizer's poisoning in a sanitizer build);
// and returns launch errors as the runtime does (block and grid limits,
// dynamic shared memory past 48 KiB without cudaFuncSetAttribute).
// Threads between two barriers run in ascending or descending order
// (set_schedule): a kernel that depends on the order (a missing barrier)
// gives different bits under the two.
#pragma once

// The toolkit headers declare their host functions with __host__ /
// __location__ attributes that only nvcc knows.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wattributes"
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#pragma GCC diagnostic pop

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __shared__ static thread_local
#define __launch_bounds__(...)

// Device code calls the overloaded math functions unqualified (sqrt(float)
// is the float square root on a GPU).
using std::sqrt;

namespace cuda_emulator {

enum class Schedule { ascending, descending };

// Order in which the threads of a block run between two synchronization
// points; process-wide.
void set_schedule(Schedule schedule);
Schedule schedule();

// The message of the last launch that failed inside a kernel (empty if none).
std::string last_failure();

// Every kernel launched so far (its address) and how many times.
std::vector<std::pair<const void*, int64_t>> launch_counts();

namespace detail {

// The index registers of the running fiber.
extern thread_local uint3 thread_idx;
extern thread_local uint3 block_idx;
extern thread_local dim3 block_dim;
extern thread_local dim3 grid_dim;
extern thread_local unsigned char* dynamic_shared;

enum class WarpOp { shfl_idx, shfl_up, shfl_down, shfl_xor, ballot, any, all, syncwarp };

// Parks the running fiber at a warp collective until every lane of `mask`
// has arrived; returns the value read from the source lane (shuffles) or the
// vote. `value` is `size` bytes (at most 16).
void warp_collective(
    WarpOp op, unsigned mask, const void* value, int size, int lane_arg, int width, int predicate,
    void* result, unsigned* vote);

void sync_threads();

using KernelCall = void (*)(void* call);

cudaError_t run_grid(
    const void* kernel, dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
    KernelCall call, void* arguments);

template <typename T>
T shuffle(WarpOp op, unsigned mask, T value, int lane_arg, int width) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 16, "shuffle of a type CUDA has no shuffle for");
  T result;
  warp_collective(op, mask, &value, sizeof(T), lane_arg, width, 0, &result, nullptr);
  return result;
}

} // namespace detail

template <typename... Params, typename... Args>
cudaError_t launch(
    void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
    Args&&... args) {
  // Arguments convert to the parameter types once, as for a launch; every
  // thread's call copies them into its own parameters.
  using Arguments = std::tuple<std::decay_t<Params>...>;
  struct Call {
    void (*kernel)(Params...);
    Arguments arguments;
  } call{kernel, Arguments(std::forward<Args>(args)...)};
  return detail::run_grid(
      reinterpret_cast<const void*>(kernel), grid, block, shared_bytes, stream,
      [](void* erased) {
        auto* c = static_cast<Call*>(erased);
        std::apply(c->kernel, c->arguments);
      },
      &call);
}

template <typename T>
inline T* dynamic_shared_memory() {
  return reinterpret_cast<T*>(detail::dynamic_shared);
}

} // namespace cuda_emulator

#define threadIdx (::cuda_emulator::detail::thread_idx)
#define blockIdx (::cuda_emulator::detail::block_idx)
#define blockDim (::cuda_emulator::detail::block_dim)
#define gridDim (::cuda_emulator::detail::grid_dim)
#define warpSize 32

inline void __syncthreads() { ::cuda_emulator::detail::sync_threads(); }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::cuda_emulator::detail::warp_collective(
      ::cuda_emulator::detail::WarpOp::syncwarp, mask, nullptr, 0, 0, 32, 0, nullptr, nullptr);
}

template <typename T>
T __shfl_sync(unsigned mask, T value, int src_lane, int width = 32) {
  return ::cuda_emulator::detail::shuffle(::cuda_emulator::detail::WarpOp::shfl_idx, mask, value, src_lane, width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  return ::cuda_emulator::detail::shuffle(
      ::cuda_emulator::detail::WarpOp::shfl_up, mask, value, static_cast<int>(delta), width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  return ::cuda_emulator::detail::shuffle(
      ::cuda_emulator::detail::WarpOp::shfl_down, mask, value, static_cast<int>(delta), width);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  return ::cuda_emulator::detail::shuffle(::cuda_emulator::detail::WarpOp::shfl_xor, mask, value, lane_mask, width);
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  unsigned vote = 0;
  ::cuda_emulator::detail::warp_collective(
      ::cuda_emulator::detail::WarpOp::ballot, mask, nullptr, 0, 0, 32, predicate, nullptr, &vote);
  return vote;
}
inline int __any_sync(unsigned mask, int predicate) {
  unsigned vote = 0;
  ::cuda_emulator::detail::warp_collective(
      ::cuda_emulator::detail::WarpOp::any, mask, nullptr, 0, 0, 32, predicate, nullptr, &vote);
  return static_cast<int>(vote);
}
inline int __all_sync(unsigned mask, int predicate) {
  unsigned vote = 0;
  ::cuda_emulator::detail::warp_collective(
      ::cuda_emulator::detail::WarpOp::all, mask, nullptr, 0, 0, 32, predicate, nullptr, &vote);
  return static_cast<int>(vote);
}

// The typed overload of cuda_runtime.h, which it declares for nvcc only.
template <typename T>
cudaError_t cudaFuncSetAttribute(T* entry, cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(entry), attr, value);
}
