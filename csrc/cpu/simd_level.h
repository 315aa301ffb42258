// Which SIMD instruction set the CPU kernels (row norms and BatchNorm) run
// with.
//
// The default build is portable (no -march flags): the kernels are compiled
// once per instruction set in their own translation units (kernels_<isa>.cpp
// for avx512, avx2 and portable), each under a
// `#pragma GCC target`, and the level is picked at run time from what the
// CPU supports. LAYERNORM_EXT_SIMD=avx512|avx2|scalar (read once, at the first
// kernel call) or set_simd_level lowers it, which is how the tests reach every
// compiled path on one machine.
#pragma once

#include <string>

namespace layernorm_ext::cpu {

enum class SimdLevel { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// The best level both this build and this CPU support.
SimdLevel supported_simd_level();

// The level the kernels use now.
SimdLevel active_simd_level();

// Makes the kernels use `level`; raises if the CPU (or build) lacks it.
void set_simd_level(SimdLevel level);

// "avx512", "avx2" or "scalar", and back (raises on any other name).
const char* simd_level_name(SimdLevel level);
SimdLevel parse_simd_level(const std::string& name);

} // namespace layernorm_ext::cpu
