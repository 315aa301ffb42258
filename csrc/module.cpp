// The Python extension module (layernorm_ext._C, or the JIT build's module).
// Importing it loads the shared library, whose static initializers register
// the ops (ops.cpp) and their kernels; the module itself only reports how the
// library was built.
#include <torch/extension.h>

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
  return info;
}

} // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "layernorm_ext kernels; the ops live under torch.ops.layernorm_ext";
  m.def("compiled_with", &compiled_with, "How this extension was built: cuda, openmp.");
}
