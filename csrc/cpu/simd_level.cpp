#include "simd_level.h"
#include "simd_targets.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>

namespace layernorm_ext::cpu {
namespace {

SimdLevel detect() {
#if LAYERNORM_EXT_X86_SIMD
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx2") &&
      __builtin_cpu_supports("fma")) {
    return SimdLevel::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return SimdLevel::kAvx2;
#endif
  return SimdLevel::kScalar;
}

// -1 until the first call resolves the default (CPU, then environment).
std::atomic<int> active_level{-1};

} // namespace

SimdLevel supported_simd_level() {
  static const SimdLevel level = detect();
  return level;
}

void set_simd_level(SimdLevel level) {
  TORCH_CHECK(
      static_cast<int>(level) <= static_cast<int>(supported_simd_level()),
      "layernorm_ext: cannot use SIMD level ", simd_level_name(level),
      ": this CPU (or build) supports at most ", simd_level_name(supported_simd_level()));
  active_level.store(static_cast<int>(level));
}

SimdLevel active_simd_level() {
  const int level = active_level.load(std::memory_order_relaxed);
  if (level >= 0) return static_cast<SimdLevel>(level);
  const char* requested = std::getenv("LAYERNORM_EXT_SIMD");
  set_simd_level(
      requested && *requested ? parse_simd_level(requested) : supported_simd_level());
  return static_cast<SimdLevel>(active_level.load());
}

const char* simd_level_name(SimdLevel level) {
  switch (level) {
    case SimdLevel::kAvx512:
      return "avx512";
    case SimdLevel::kAvx2:
      return "avx2";
    case SimdLevel::kScalar:
      break;
  }
  return "scalar";
}

SimdLevel parse_simd_level(const std::string& name) {
  for (auto level : {SimdLevel::kAvx512, SimdLevel::kAvx2, SimdLevel::kScalar}) {
    if (name == simd_level_name(level)) return level;
  }
  TORCH_CHECK(false, "layernorm_ext: unknown SIMD level '", name,
      "' (LAYERNORM_EXT_SIMD or _set_simd_level); expected avx512, avx2 or scalar");
}

} // namespace layernorm_ext::cpu
