// Memory for the CPU ops' large outputs (y, dx, the fused sum), reused from a
// bounded cache of blocks that earlier outputs freed.
//
// Why: a fresh multi-megabyte buffer from malloc is mmap'ed, so the kernel
// that first writes it takes a page fault (a trap and a zeroed 4 KiB page) every
// 4 KiB. On the 2-core VM the benchmarks run on, that costs 4-6x the
// normalization itself: a LayerNorm forward on 8192x1024 fp32 takes 17 ms with
// fresh memory and 2.7 ms writing into memory it wrote before. A training loop
// asks for the same sizes every step, so a freed block of the right size is
// nearly always there to take.
//
// Tensors made here are ordinary CPU tensors (resizable storage, any view or
// in-place op works); only where their bytes come from and go to differs.
// Blocks smaller than kMinCachedBytes come from and return to torch's CPU
// allocator. Larger ones are mapped from the OS in size classes (eight per
// doubling), so that a block also serves later requests a little smaller
// than it (growing sizes within a class), wasting at most an eighth of it.
// Idle blocks held by the cache never exceed the limit
// (LAYERNORM_EXT_CPU_CACHE_MB, default 128; 0 disables caching); the oldest
// freed block goes first when it would. An evicted or emptied block is
// unmapped: its memory goes back to the OS at once.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace layernorm_ext::cpu {

// An uninitialized CPU tensor, like at::empty(sizes, options.memory_format(format)).
at::Tensor empty_output(
    at::IntArrayRef sizes,
    const at::TensorOptions& options,
    at::MemoryFormat format = at::MemoryFormat::Contiguous);

struct OutputCacheInfo {
  int64_t cached_bytes;  // idle blocks held now
  int64_t limit_bytes;
  int64_t hits;  // allocations served from the cache
  int64_t misses;  // cacheable allocations that found no block
};

OutputCacheInfo output_cache_info();

// Sets the limit on idle cached bytes, freeing the oldest blocks above it.
void set_output_cache_limit(int64_t bytes);

// Frees every idle block (blocks in use are unaffected); returns the bytes freed.
int64_t empty_output_cache();

} // namespace layernorm_ext::cpu
