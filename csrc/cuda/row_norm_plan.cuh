// How the row-norm kernels (forward and backward) map rows onto threads, and
// the instantiation helpers both .cu files share. Included by .cu files only.
//
// Three shapes of work, picked by the row length:
//  - short and mid rows (up to kWarpSize * kMaxLanePacks packs of 16 bytes,
//    i.e. 1024 float / 2048 half / 512 double elements): a group of `width`
//    lanes owns a row and keeps it in registers, `width` being the power of two
//    that covers the row with one pack a lane (several rows a warp for short
//    rows), or the whole warp with up to kMaxLanePacks packs a lane. Row sums
//    are shuffle butterflies, no shared memory, no barrier;
//  - long rows: a block owns a row, which the first sweep caches in shared
//    memory (when it fits in kMaxCacheBytes) so that later sweeps read it from
//    there, not from device memory;
//  - very long rows (past the cache): the block re-reads the row from L2,
//    with statistics taken in one sweep (Welford, Chan merges in a fixed order).
// Block-path sweeps are unrolled by 4 so that each thread has several 16-byte
// loads in flight before it uses the first.
// Vector packs need cols % kVec == 0 and 16-byte aligned rows; otherwise the
// same kernels run with one element a pack.
#pragma once

#include "common.cuh"

#include <algorithm>
#include <type_traits>

namespace layernorm_ext::cuda::row_plan {

constexpr int kWarpBlockThreads = 128;
constexpr int kMaxLanePacks = 8;
constexpr int64_t kMaxCacheBytes = 64 << 10;
// Default dynamic shared memory limit, above which a kernel must opt in.
constexpr int64_t kDefaultSharedBytes = 48 << 10;
constexpr int64_t kMaxGridBlocks = int64_t{1} << 20;

struct Plan {
  bool warp_path;
  int width;      // warp path: lanes a row
  int lane_packs; // warp path: packs a lane, a power of two <= kMaxLanePacks
  int threads;    // block size
  int64_t blocks;
  bool cached;         // block path: row cached in shared memory
  int64_t cache_bytes; // block path: dynamic shared memory
};

inline int next_pow2(int64_t n) {
  int p = 1;
  while (p < n) p *= 2;
  return p;
}

// `row_bytes` is what a block path caches of one row (the input row; input and
// grad_output rows in the backward).
inline Plan plan(int64_t rows, int64_t cols, int vec, int64_t row_bytes) {
  Plan p{};
  const int64_t packs = (cols + vec - 1) / vec;
  // The scalar fallback keeps a register row only for rows of one pack a lane,
  // which keeps the number of instantiations down.
  const int64_t max_warp_packs = vec > 1 ? int64_t{kWarpSize} * kMaxLanePacks : kWarpSize;
  if (packs <= max_warp_packs) {
    p.warp_path = true;
    p.width = packs <= kWarpSize ? std::max(1, next_pow2(packs)) : kWarpSize;
    p.lane_packs = packs <= kWarpSize ? 1 : next_pow2((packs + kWarpSize - 1) / kWarpSize);
    p.threads = kWarpBlockThreads;
    const int64_t rows_per_block = (kWarpBlockThreads / kWarpSize) * (kWarpSize / p.width);
    p.blocks = std::min((rows + rows_per_block - 1) / rows_per_block, kMaxGridBlocks);
    return p;
  }
  p.warp_path = false;
  int threads = 128;
  while (threads < 1024 && threads * int64_t{8} < packs) threads *= 2;
  p.threads = threads;
  p.blocks = std::min(rows, kMaxGridBlocks);
  int device = 0;
  int optin = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  p.cached = row_bytes <= std::min<int64_t>(kMaxCacheBytes, optin);
  p.cache_bytes = p.cached ? row_bytes : 0;
  return p;
}

// Raises a kernel's dynamic shared memory limit when `bytes` needs it.
template <typename Kernel>
cudaError_t allow_shared_bytes(Kernel kernel, int64_t bytes) {
  if (bytes <= kDefaultSharedBytes) return cudaSuccess;
  return cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

// Calls f(std::integral_constant<int, P>) for P = lane_packs in {1, 2, 4, 8}.
template <typename F>
cudaError_t with_lane_packs(int lane_packs, F&& f) {
  switch (lane_packs) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 4: return f(std::integral_constant<int, 4>{});
    default: return f(std::integral_constant<int, kMaxLanePacks>{});
  }
}

} // namespace layernorm_ext::cuda::row_plan

// Explicit instantiations of a row-norm launcher `fn` for every (kCenter, T, W)
// the ops accept. `args` is the parenthesized parameter list with T, W, acc.
#define LAYERNORM_EXT_INSTANTIATE_ROW_NORM_ONE(fn, center, T, W)                   \
  template cudaError_t fn<center, T, W>(LAYERNORM_EXT_ROW_NORM_ARGS(T, W, acc_t<T>));
#define LAYERNORM_EXT_INSTANTIATE_ROW_NORM_CENTER(fn, center)                      \
  LAYERNORM_EXT_INSTANTIATE_ROW_NORM_ONE(fn, center, float, float)                 \
  LAYERNORM_EXT_INSTANTIATE_ROW_NORM_ONE(fn, center, double, double)               \
  LAYERNORM_EXT_INSTANTIATE_ROW_NORM_ONE(fn, center, __half, __half)               \
  LAYERNORM_EXT_INSTANTIATE_ROW_NORM_ONE(fn, center, __half, float)                \
  LAYERNORM_EXT_INSTANTIATE_ROW_NORM_ONE(fn, center, __nv_bfloat16, __nv_bfloat16) \
  LAYERNORM_EXT_INSTANTIATE_ROW_NORM_ONE(fn, center, __nv_bfloat16, float)
#define LAYERNORM_EXT_INSTANTIATE_ROW_NORM(fn)        \
  LAYERNORM_EXT_INSTANTIATE_ROW_NORM_CENTER(fn, true) \
  LAYERNORM_EXT_INSTANTIATE_ROW_NORM_CENTER(fn, false)
