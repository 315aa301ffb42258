// The layernorm_ext op library: its schemas (op_schemas.h). Each backend
// registers its kernels in its own files (cpu/*_cpu.cpp, cuda/*_cuda.cpp)
// with TORCH_LIBRARY_IMPL; the autograd of every op, the backward ops'
// included, is C++ too, one kernel for every backend (autograd_*_ops.cpp). Fake
// (meta) kernels and vmap rules are registered from Python, next to each op's
// wrapper (layernorm_ext/<op>.py, _vmap.py).
#include "op_schemas.h"

TORCH_LIBRARY(layernorm_ext, m) {
  layernorm_ext::define_ops(m);
}
