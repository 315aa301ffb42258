// Device helpers shared by the CUDA kernels: explicit
// dtype conversions, 16-byte vector packs, deterministic warp/block sums and
// Welford statistics with Chan's merge.
//
// No torch header here: every .cu of csrc/cuda compiles with nvcc alone
// (tools/check_cuda_kernels.sh), on the flags torch's extension builder uses,
// which disable the implicit __half/__nv_bfloat16 conversions; hence the
// explicit to_acc/from_acc below.
#pragma once

#include "acc_type.h"
#include "launch.cuh"

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace layernorm_ext::cuda {

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

// Rounds an accumulator to the storage type T (round to nearest even).
template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return v;
  }
}

// 1 / sqrt(var + eps) rounded once to acc: formed in double (eps as the op
// was given it, not rounded to float), where the same formula in float32
// rounds eps, the sum, the root and the quotient (up to about 1.5 ulp, against
// 0.5); the CPU kernels form it the same way. Once per row or channel.
template <typename acc>
__device__ __forceinline__ acc inverse_std(acc var, double eps) {
  return static_cast<acc>(1.0 / sqrt(static_cast<double>(var) + eps));
}

// Elements per 16-byte access.
template <typename T>
constexpr int kVecOf = 16 / static_cast<int>(sizeof(T));

// kVec consecutive elements moved by one (or, for a 32-byte pack of float
// parameters next to half input, two) wide access. A pack must be aligned to
// its size; the launchers check the pointers and fall back to kVec = 1.
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <int kVec, typename T>
__device__ __forceinline__ Pack<T, kVec> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, kVec>*>(p);
}

template <int kVec, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, kVec>& pack) {
  *reinterpret_cast<Pack<T, kVec>*>(p) = pack;
}

// True when p can be accessed in packs of `bytes`.
inline bool is_aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Sum over aligned groups of `width` lanes (a power of two <= 32). A xor
// butterfly: every lane of a group ends with the same bits, in an order fixed
// by the width alone. Every lane of the warp must call it.
template <typename acc>
__device__ __forceinline__ acc group_sum(acc v, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(kFullMask, v, offset, width);
  }
  return v;
}

// Sums kN values over the whole block and returns the totals to every thread.
// `scratch` holds kN * 32 accumulators in shared memory. Warps sum by
// butterfly, then every thread adds the warp totals in warp order, so the bits
// depend on the block size only. Ends with a barrier, so scratch may be reused.
template <int kN, typename acc>
__device__ __forceinline__ void block_sum(acc (&v)[kN], acc* scratch) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int warps = (blockDim.x + kWarpSize - 1) / kWarpSize;
#pragma unroll
  for (int i = 0; i < kN; ++i) {
    v[i] = group_sum(v[i], kWarpSize);
    if (lane == 0) scratch[i * kWarpSize + warp] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kN; ++i) {
    acc total = 0;
    for (int w = 0; w < warps; ++w) total += scratch[i * kWarpSize + w];
    v[i] = total;
  }
  __syncthreads();
}

// Running mean and sum of squared deviations of `count` values (Welford).
// The count is an integer so that it stays exact past 2^24 values.
template <typename acc>
struct Welford {
  int64_t count;
  acc mean;
  acc m2;
};

template <typename acc>
__device__ __forceinline__ void welford_push(Welford<acc>& s, acc x) {
  s.count += 1;
  const acc delta = x - s.mean;
  s.mean += delta / static_cast<acc>(s.count);
  s.m2 += delta * (x - s.mean);
}

// Chan et al.'s merge of two disjoint sets' statistics.
template <typename acc>
__device__ __forceinline__ Welford<acc> welford_merge(const Welford<acc>& a, const Welford<acc>& b) {
  const int64_t count = a.count + b.count;
  if (count == 0) return a;
  const acc delta = b.mean - a.mean;
  const acc b_share = static_cast<acc>(b.count) / static_cast<acc>(count);
  return {count, a.mean + delta * b_share,
          a.m2 + b.m2 + delta * delta * static_cast<acc>(a.count) * b_share};
}

template <typename acc>
__device__ __forceinline__ Welford<acc> shfl_down(const Welford<acc>& s, int offset) {
  return {__shfl_down_sync(kFullMask, s.count, offset), __shfl_down_sync(kFullMask, s.mean, offset),
          __shfl_down_sync(kFullMask, s.m2, offset)};
}

// Merges a per-thread state (Welford, or any state with a shfl_down overload)
// over the whole block and returns the result to every thread: a shuffle tree
// in each warp, then the warp results in warp order, so the bits depend on the
// block size only. `scratch` holds 32 states in shared memory; ends with a
// barrier.
template <typename State, typename Merge>
__device__ __forceinline__ State block_merge(State s, State* scratch, Merge merge) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int warps = (blockDim.x + kWarpSize - 1) / kWarpSize;
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    s = merge(s, shfl_down(s, offset));
  }
  if (lane == 0) scratch[warp] = s;
  __syncthreads();
  State total = scratch[0];
  for (int w = 1; w < warps; ++w) total = merge(total, scratch[w]);
  __syncthreads();
  return total;
}

template <typename acc>
__device__ __forceinline__ Welford<acc> block_welford(const Welford<acc>& s, Welford<acc>* scratch) {
  return block_merge(s, scratch, [](const Welford<acc>& a, const Welford<acc>& b) {
    return welford_merge(a, b);
  });
}

} // namespace layernorm_ext::cuda
