// The Python extension module (layernorm_ext._C, or the JIT build's module).
// Importing it loads the shared library, whose static initializers register
// the ops (ops.cpp) and their kernels; the module itself reports how the library
// was built.
#include "eager_calls.h"
#include "cpu/output_stores.h"
#include "cpu/simd_level.h"

#include <torch/extension.h>

#include <cstdint>

namespace {

pybind11::dict compiled_with() {
  pybind11::dict info;
#ifdef LAYERNORM_EXT_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["simd"] = layernorm_ext::cpu::simd_level_name(layernorm_ext::cpu::active_simd_level());
  return info;
}

} // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "layernorm_ext kernels; the ops live under torch.ops.layernorm_ext";
  m.def("compiled_with", &compiled_with,
      "How this extension was built: cuda, openmp, and the SIMD level the CPU kernels use.");
  // For tests and benchmarks: forces the CPU kernels onto one SIMD level
  // ("avx512", "avx2" or "scalar"; at most what the CPU supports).
  m.def("_set_simd_level", [](const std::string& name) {
    layernorm_ext::cpu::set_simd_level(layernorm_ext::cpu::parse_simd_level(name));
  });
  // For tests: how the CPU kernels write outputs of 16 MiB or more ("auto":
  // non-temporal stores into resident memory; "streamed", "plain": always
  // that way, where alignment permits).
  m.def("_set_output_stores", [](const std::string& name) {
    layernorm_ext::cpu::set_output_stores(layernorm_ext::cpu::parse_output_stores(name));
  });
  // For tests: whether an output ending at this address would be streamed.
  m.def("_streams_output_at", [](std::uintptr_t last) {
    return layernorm_ext::cpu::stream_output_memory(reinterpret_cast<const void*>(last));
  });
  // The forward ops without torch.ops' boxing, for the eager wrappers
  // (layernorm_ext/_eager.py).
  auto eager = m.def_submodule("eager", "direct calls to the forward ops (see _eager.py)");
  layernorm_ext::register_eager_calls(eager);
}
