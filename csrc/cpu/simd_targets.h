// Whether the AVX2 and AVX-512 CPU kernels are built: with GCC on x86-64
// only (they rely on `#pragma GCC target`, which Clang ignores); elsewhere
// only the portable kernels are.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LAYERNORM_EXT_X86_SIMD 1
#else
#define LAYERNORM_EXT_X86_SIMD 0
#endif
