// Kernels that show the executor's checks at work (tests/test_cuda_executor.py):
// each is a small, deliberate instance of a bug class the executor must
// report, or of a warp intrinsic whose result the test checks against the
// CUDA programming guide's definition. Written as CUDA, launched through
// cuda_emulator::launch as the project's kernels are.
#include "cuda_emulator.h"

#include <torch/extension.h>

#include <functional>
#include <map>
#include <string>
#include <vector>

namespace {

using cuda_emulator::dynamic_shared_memory;
using cuda_emulator::launch;

// Thread t stores t + 1 and reads its right neighbour's value; without the
// barrier between store and load the value read depends on the thread order.
template <bool kBarrier>
__global__ void neighbour_exchange_kernel(float* out) {
  float* slots = dynamic_shared_memory<float>();
  const int t = threadIdx.x;
  slots[t] = static_cast<float>(t + 1);
  if (kBarrier) __syncthreads();
  out[blockIdx.x * blockDim.x + t] = slots[(t + 1) % blockDim.x];
}

// Writes each thread's index in the block (first row of blocks only).
__global__ void thread_index_kernel(float* out) {
  if (blockIdx.y == 0) out[threadIdx.y * blockDim.x + threadIdx.x] = static_cast<float>(threadIdx.x);
}

// Half of the block returns before a barrier the other half waits at.
__global__ void early_return_before_barrier_kernel(float* out) {
  if (threadIdx.x < 16) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

// A full-mask shuffle that only the lower half-warp reaches.
__global__ void shuffle_mask_names_absent_lane_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// The lower half-warp shuffles down among itself, but lane 15 reads lane 16,
// which the mask leaves out (width 16 would keep it inside its half).
__global__ void shuffle_reads_outside_mask_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x % 32 < 16) v = __shfl_down_sync(0x0000ffffu, v, 1);
  out[threadIdx.x] = v;
}

// Every lane calls with a mask of lane 0 alone.
__global__ void calling_lane_outside_mask_kernel(float* out) {
  out[threadIdx.x] = __shfl_sync(0x1u, static_cast<float>(threadIdx.x), 0);
}

// Reads one float past the launch's dynamic shared memory.
__global__ void shared_read_past_size_kernel(float* out, int floats) {
  out[threadIdx.x] = dynamic_shared_memory<float>()[floats + static_cast<int>(threadIdx.x)];
}

// Reads one element past the end of the input.
__global__ void global_read_past_end_kernel(const float* input, float* out, int n) {
  out[threadIdx.x] = input[n + static_cast<int>(threadIdx.x)];
}

// Records, for every lane, the results of each warp intrinsic with the lane's
// own index as value: out[op][lane].
__global__ void warp_intrinsics_kernel(int* out, int delta, int width) {
  const int lane = threadIdx.x;
  int* row = out;
  row[0 * 32 + lane] = __shfl_sync(0xffffffffu, lane, delta, width);
  row[1 * 32 + lane] = __shfl_up_sync(0xffffffffu, lane, delta, width);
  row[2 * 32 + lane] = __shfl_down_sync(0xffffffffu, lane, delta, width);
  row[3 * 32 + lane] = __shfl_xor_sync(0xffffffffu, lane, delta, width);
  row[4 * 32 + lane] = static_cast<int>(__ballot_sync(0xffffffffu, lane % (delta + 1) == 0));
  row[5 * 32 + lane] = __any_sync(0xffffffffu, lane == delta);
  row[6 * 32 + lane] = __all_sync(0xffffffffu, lane >= delta);
  __syncwarp();
}

std::string status(cudaError_t err) {
  if (err == cudaSuccess) return "";
  std::string message = cudaGetErrorString(err);
  const std::string detail = cuda_emulator::last_failure();
  if (err == cudaErrorLaunchFailure && !detail.empty()) message += ": " + detail;
  return message;
}

// Runs `run` under both schedules; returns the two outputs.
std::vector<at::Tensor> under_both_schedules(const std::function<at::Tensor()>& run) {
  cuda_emulator::set_schedule(cuda_emulator::Schedule::ascending);
  auto first = run();
  cuda_emulator::set_schedule(cuda_emulator::Schedule::descending);
  auto second = run();
  cuda_emulator::set_schedule(cuda_emulator::Schedule::ascending);
  return {first, second};
}

at::Tensor checked(cudaError_t err, at::Tensor out) {
  const std::string message = status(err);
  TORCH_CHECK(message.empty(), message);
  return out;
}

} // namespace

// The outputs of neighbour_exchange under the ascending and the descending schedule.
std::vector<at::Tensor> neighbour_exchange(bool barrier, int64_t blocks, int64_t threads) {
  return under_both_schedules([&] {
    auto out = at::empty({blocks * threads}, at::kFloat);
    auto kernel = barrier ? neighbour_exchange_kernel<true> : neighbour_exchange_kernel<false>;
    return checked(
        launch(kernel, dim3(blocks), dim3(threads), threads * sizeof(float), nullptr, out.mutable_data_ptr<float>()),
        out);
  });
}

// The error a faulty kernel's launch returns ("" when it succeeds).
std::string launch_faulty(const std::string& name, int64_t threads) {
  auto out = at::zeros({4096}, at::kFloat);
  float* o = out.mutable_data_ptr<float>();
  const std::map<std::string, std::function<cudaError_t()>> kernels{
      {"early_return_before_barrier", [&] { return launch(early_return_before_barrier_kernel, 1, threads, 0, nullptr, o); }},
      {"shuffle_mask_names_absent_lane", [&] { return launch(shuffle_mask_names_absent_lane_kernel, 1, threads, 0, nullptr, o); }},
      {"shuffle_reads_outside_mask", [&] { return launch(shuffle_reads_outside_mask_kernel, 1, threads, 0, nullptr, o); }},
      {"calling_lane_outside_mask", [&] { return launch(calling_lane_outside_mask_kernel, 1, threads, 0, nullptr, o); }},
  };
  const auto kernel = kernels.find(name);
  TORCH_CHECK(kernel != kernels.end(), "no faulty kernel named ", name);
  return status(kernel->second());
}

// Launch errors: the launch's error code as a string ("" for success).
std::string launch_with(int64_t block_x, int64_t block_y, int64_t grid_y, int64_t shared_bytes, int64_t allow_shared) {
  auto out = at::zeros({block_x * block_y}, at::kFloat);
  if (allow_shared > 0) {
    TORCH_CHECK(cudaFuncSetAttribute(thread_index_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(allow_shared)) == cudaSuccess);
  }
  const cudaError_t err = launch(thread_index_kernel, dim3(1, grid_y), dim3(block_x, block_y),
                                 shared_bytes, nullptr, out.mutable_data_ptr<float>());
  // The launch helper, like launch.cuh's on a GPU, has taken the error.
  TORCH_CHECK(cudaGetLastError() == cudaSuccess, "a launch left its error pending");
  return status(err);
}

// Reads past the dynamic shared memory (the process faults or, under
// AddressSanitizer, reports and aborts).
at::Tensor read_shared_past_size(int64_t floats) {
  auto out = at::zeros({32}, at::kFloat);
  return checked(launch(shared_read_past_size_kernel, 1, 32, floats * sizeof(float), nullptr,
                        out.mutable_data_ptr<float>(), static_cast<int>(floats)),
                 out);
}

// Reads past the end of `input` (AddressSanitizer reports it).
at::Tensor read_global_past_end(const at::Tensor& input) {
  auto out = at::zeros({32}, at::kFloat);
  return checked(launch(global_read_past_end_kernel, 1, 1, 0, nullptr, input.const_data_ptr<float>(),
                        out.mutable_data_ptr<float>(), static_cast<int>(input.numel())),
                 out);
}

// [7, 32]: __shfl_sync, __shfl_up_sync, __shfl_down_sync, __shfl_xor_sync,
// __ballot_sync, __any_sync, __all_sync of one warp, value = lane.
std::vector<at::Tensor> warp_intrinsics(int64_t delta, int64_t width) {
  return under_both_schedules([&] {
    auto out = at::zeros({7, 32}, at::kInt);
    return checked(launch(warp_intrinsics_kernel, 1, 32, 0, nullptr, out.mutable_data_ptr<int>(),
                          static_cast<int>(delta), static_cast<int>(width)),
                   out);
  });
}
