// CUDA_EMULATOR_ASAN is defined in a build with AddressSanitizer, whose
// interface then comes along: the fibers announce their stack switches, and
// dynamic shared memory poisons the bytes past a launch's size.
#pragma once

#if defined(__SANITIZE_ADDRESS__)
#define CUDA_EMULATOR_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CUDA_EMULATOR_ASAN 1
#endif
#endif

#ifdef CUDA_EMULATOR_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
