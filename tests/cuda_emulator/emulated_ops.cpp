// The test-only op library of the CPU executor: the layernorm_ext schemas
// (op_schemas.h) defined again in the namespace layernorm_ext_cuda_emulated,
// whose CPU kernels are the CUDA glue of csrc/cuda/*_cuda.cpp built against
// cuda_emulator.h. Every call runs twice, its threads in ascending and then
// in descending order between barriers, and fails unless both give the same
// bits: a kernel that reads what another thread has not yet written (a
// missing barrier) shows as a difference. Its outputs and workspaces start as
// NaN, so an element that no kernel writes shows too.
#include "../../csrc/op_schemas.h"
#include "cuda_emulator.h"
#include "selftest_kernels.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <dlfcn.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cstring>
#include <string>

namespace {

bool same_bits(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes() || a.scalar_type() != b.scalar_type() || a.strides() != b.strides()) {
    return false;
  }
  const auto ca = a.contiguous();
  const auto cb = b.contiguous();
  return std::memcmp(ca.const_data_ptr(), cb.const_data_ptr(), ca.nbytes()) == 0;
}

// While alive, fresh tensors (the glue's outputs and workspaces) start as NaN
// (integers: their largest value), as torch does under deterministic
// algorithms, so that an element no kernel writes shows.
class UnwrittenMemoryShows {
 public:
  UnwrittenMemoryShows()
      : deterministic_(at::globalContext().deterministicAlgorithms()),
        warn_only_(at::globalContext().deterministicAlgorithmsWarnOnly()),
        fill_(at::globalContext().deterministicFillUninitializedMemory()) {
    at::globalContext().setDeterministicAlgorithms(true, warn_only_);
    at::globalContext().setDeterministicFillUninitializedMemory(true);
  }
  ~UnwrittenMemoryShows() {
    at::globalContext().setDeterministicAlgorithms(deterministic_, warn_only_);
    at::globalContext().setDeterministicFillUninitializedMemory(fill_);
  }

 private:
  bool deterministic_;
  bool warn_only_;
  bool fill_;
};

void run_under_both_schedules(
    const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const UnwrittenMemoryShows unwritten_memory_shows;
  const size_t num_args = op.schema().arguments().size();
  torch::jit::Stack descending(stack->end() - static_cast<std::ptrdiff_t>(num_args), stack->end());
  const auto below_autograd = keys & c10::after_autograd_keyset;
  cuda_emulator::set_schedule(cuda_emulator::Schedule::ascending);
  op.redispatchBoxed(below_autograd, stack);
  cuda_emulator::set_schedule(cuda_emulator::Schedule::descending);
  try {
    op.redispatchBoxed(below_autograd, &descending);
  } catch (...) {
    cuda_emulator::set_schedule(cuda_emulator::Schedule::ascending);
    throw;
  }
  cuda_emulator::set_schedule(cuda_emulator::Schedule::ascending);
  const size_t num_returns = op.schema().returns().size();
  for (size_t i = 0; i < num_returns; ++i) {
    const auto& first = (*stack)[stack->size() - num_returns + i];
    const auto& second = descending[descending.size() - num_returns + i];
    if (!first.isTensor()) continue;
    TORCH_CHECK(
        same_bits(first.toTensor(), second.toTensor()), op.schema().name(), ": output ", i, " (",
        op.schema().returns()[i].name(),
        ") differs between the ascending and descending thread schedules: a kernel depends on the "
        "order of its threads between barriers (a missing __syncthreads or __syncwarp)");
  }
}

std::string op_name(const char* schema) {
  const std::string s(schema);
  return s.substr(0, s.find('('));
}

} // namespace

TORCH_LIBRARY(layernorm_ext_cuda_emulated, m) {
  layernorm_ext::define_ops(m);
}

TORCH_LIBRARY_IMPL(layernorm_ext_cuda_emulated, AutogradCPU, m) {
  for (const char* schema : layernorm_ext::kOpSchemas) {
    m.impl(op_name(schema).c_str(), torch::CppFunction::makeFromBoxedFunction<&run_under_both_schedules>());
  }
}

// Launched kernels as (offset of the kernel in this library, launches), so
// that the tests can name them from the library's symbol table.
static std::vector<std::pair<int64_t, int64_t>> launched_kernels() {
  std::vector<std::pair<int64_t, int64_t>> result;
  for (const auto& [kernel, count] : cuda_emulator::launch_counts()) {
    Dl_info info{};
    if (dladdr(kernel, &info) == 0) continue;
    result.emplace_back(
        reinterpret_cast<const char*>(kernel) - static_cast<const char*>(info.dli_fbase), count);
  }
  return result;
}

static std::string library_path() {
  Dl_info info{};
  dladdr(reinterpret_cast<const void*>(&launched_kernels), &info);
  return info.dli_fname ? info.dli_fname : "";
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CPU executor of the CUDA kernels (tests only)";
  m.def("launched_kernels", &launched_kernels,
        "(offset in this library, launch count) of every kernel launched so far");
  m.def("library_path", &library_path, "path of this library (to read its symbols)");
  // The executor's own checks, on deliberately faulty kernels.
  m.def("neighbour_exchange", &neighbour_exchange);
  m.def("launch_faulty", &launch_faulty);
  m.def("launch_with", &launch_with);
  m.def("read_shared_past_size", &read_shared_past_size);
  m.def("read_global_past_end", &read_global_past_end);
  m.def("warp_intrinsics", &warp_intrinsics);
}
