// Direct Python entry points to the forward ops (see eager_calls.cpp).
#pragma once

#include <pybind11/pybind11.h>

namespace layernorm_ext {

// Adds the forward ops (layer_norm_forward, rms_norm_forward,
// batch_norm_forward, fused_add_layer_norm_forward, fused_add_rms_norm_forward)
// to `m`, with the ops' arguments and results.
void register_eager_calls(pybind11::module_& m);

} // namespace layernorm_ext
