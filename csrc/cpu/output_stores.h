// How the CPU kernels write an output too large to stay in cache
// (kStreamBytes or more, simd_kernel_helpers.h): with non-temporal stores or
// ordinary ones, chosen from the state of its memory.
//
// Non-temporal stores skip the read for ownership of each line they write:
// a third less traffic when the destination is mapped in and out of cache,
// as a buffer an allocator reuses is (tcmalloc, jemalloc, glibc's heap).
// A freshly mapped destination (glibc mmaps every allocation of 32 MiB or
// more) is the opposite case: the first store to each page faults, the OS
// zeroes the page through the cache, and non-temporal stores then have to
// evict the lines just zeroed, where ordinary stores find them in cache
// (LayerNorm float32 forward on 8192x4096, 1 thread, glibc: 95 ms streamed,
// 87 ms plain). So an output is streamed when the page of its last element
// is resident (the first page may hold the allocator's header); the one
// mincore() call costs about a microsecond against milliseconds of writing.
#pragma once

#include <string>

namespace layernorm_ext::cpu {

enum class OutputStores { kAuto, kStreamed, kPlain };

// Whether to write an output that ends at `last` (a pointer to its last
// element) with non-temporal stores, size and alignment permitting. kAuto:
// when that page is resident (always where the OS cannot tell, as off Linux).
bool stream_output_memory(const void* last);

// For tests: kStreamed or kPlain make every output large and aligned enough
// take that path; kAuto (the default) decides by residency.
void set_output_stores(OutputStores stores);

// "auto", "streamed" or "plain" (raises on any other name).
OutputStores parse_output_stores(const std::string& name);

} // namespace layernorm_ext::cpu
