// Direct Python entry points to the forward ops (see eager_calls.cpp).
#pragma once

#include <pybind11/pybind11.h>

namespace layernorm_ext {

// Adds layer_norm, rms_norm, batch_norm, fused_add_layer_norm and
// fused_add_rms_norm to `m`: the forward ops' arguments, and the results the
// Python wrappers use.
void register_eager_calls(pybind11::module_& m);

} // namespace layernorm_ext
