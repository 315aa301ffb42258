// LayerNorm / RMSNorm forward on CUDA, plain and with a fused residual add:
// one template for the four ops (kCenter: LayerNorm or RMSNorm; kAddResidual:
// the row is sum = input + residual, written out and normalized).
// Thread mapping: see row_norm_plan.cuh. Every row (and residual row) is read
// from device memory once and the output (and sum) written once; statistics
// are kept in acc_t<T>.
#include "row_norm.cuh"
#include "row_norm_plan.cuh"

namespace layernorm_ext::cuda {
namespace {

using namespace row_plan;

// y = (x - mean) * rstd * weight + bias for one pack, in the CPU kernel's
// order of operations.
template <int kVec, typename T, typename W, typename acc>
__device__ __forceinline__ Pack<T, kVec> normalize_pack(
    const Pack<T, kVec>& in, const W* weight, const W* bias, int64_t col, acc mu, acc rs) {
  Pack<W, kVec> w_pack, b_pack;
  if (weight) w_pack = load_pack<kVec>(weight + col);
  if (bias) b_pack = load_pack<kVec>(bias + col);
  Pack<T, kVec> out;
#pragma unroll
  for (int v = 0; v < kVec; ++v) {
    const acc w = weight ? to_acc(w_pack.v[v]) : acc(1);
    const acc b = bias ? to_acc(b_pack.v[v]) : acc(0);
    out.v[v] = from_acc<T>((to_acc(in.v[v]) - mu) * rs * w + b);
  }
  return out;
}

// The fused sum of one pack, rounded to T as torch's separate add rounds it
// (half/bfloat16 added in float, rounded once), since the norm is of the
// rounded sum: the CPU kernel's order of operations.
template <int kVec, typename T>
__device__ __forceinline__ Pack<T, kVec> add_packs(const Pack<T, kVec>& a, const Pack<T, kVec>& b) {
  Pack<T, kVec> out;
#pragma unroll
  for (int v = 0; v < kVec; ++v) out.v[v] = from_acc<T>(to_acc(a.v[v]) + to_acc(b.v[v]));
  return out;
}

// One pack of the row to normalize: the input's, or with kAddResidual the sum
// of the input's and the residual's, which is also stored to sum_out. Each
// addend is read once and the sum written once.
template <bool kAddResidual, int kVec, typename T>
__device__ __forceinline__ Pack<T, kVec> load_row_pack(
    const T* input, const T* residual, T* sum_out, int64_t offset) {
  const auto in = load_pack<kVec>(input + offset);
  if constexpr (!kAddResidual) {
    return in;
  } else {
    const auto added = add_packs(in, load_pack<kVec>(residual + offset));
    store_pack<kVec>(sum_out + offset, added);
    return added;
  }
}

// Short and mid rows. A group of `width` lanes owns a row; lane t of the group
// holds packs t, t + width, ... in registers (kPacks of them), so that each
// step of the group reads width * 16 contiguous bytes. The warp walks over
// its rows grid-stride, all lanes together (the shuffles need every lane,
// also those whose row is past the end). The fused sum is formed as the packs
// are loaded, so the registers hold the sum: no second read of anything.
template <bool kCenter, bool kAddResidual, typename T, typename W, int kVec, int kPacks>
__global__ void __launch_bounds__(kWarpBlockThreads) row_norm_forward_warp_kernel(
    const T* __restrict__ input,
    const T* __restrict__ residual,
    T* __restrict__ sum_out,
    const W* __restrict__ weight,
    const W* __restrict__ bias,
    T* __restrict__ output,
    acc_t<T>* __restrict__ mean,
    acc_t<T>* __restrict__ rstd,
    int64_t rows,
    int cols,
    int width,
    double eps) {
  using acc = acc_t<T>;
  const int lane = threadIdx.x % kWarpSize;
  const int lane_in_row = lane % width;
  const int rows_per_warp = kWarpSize / width;
  const int64_t warps_per_block = blockDim.x / kWarpSize;
  const int64_t warp = blockIdx.x * warps_per_block + threadIdx.x / kWarpSize;
  const int64_t warp_step = gridDim.x * warps_per_block * rows_per_warp;
  for (int64_t first = warp * rows_per_warp; first < rows; first += warp_step) {
    const int64_t row = first + lane / width;
    const bool valid = row < rows;
    const int64_t row_offset = (valid ? row : 0) * cols;
    auto col_of = [&](int p) { return (p * width + lane_in_row) * kVec; };
    auto owns = [&](int p) { return valid && col_of(p) < cols; };

    Pack<T, kVec> row_packs[kPacks];
    acc sum = 0;
#pragma unroll
    for (int p = 0; p < kPacks; ++p) {
      if (owns(p)) {
        row_packs[p] = load_row_pack<kAddResidual, kVec>(
            input, residual, sum_out, row_offset + col_of(p));
#pragma unroll
        for (int v = 0; v < kVec; ++v) sum += to_acc(row_packs[p].v[v]);
      }
    }
    // Corrected two-pass statistics: the first mean carries the rounding of a
    // sum of `cols` values of the row's magnitude (1e-3 of the spread for a
    // float row of mean 1e4 and spread 1); the sum of the deviations from it
    // removes that error, so rows with a large mean keep their spread.
    const acc first_mu = kCenter ? group_sum(sum, width) / cols : acc(0);
    acc deviations = 0, squares = 0;
#pragma unroll
    for (int p = 0; p < kPacks; ++p) {
      if (owns(p)) {
#pragma unroll
        for (int v = 0; v < kVec; ++v) {
          const acc d = to_acc(row_packs[p].v[v]) - first_mu;
          if constexpr (kCenter) deviations += d;
          squares += d * d;
        }
      }
    }
    acc mu = 0, var = 0;
    if constexpr (kCenter) {
      const acc deviation_sum = group_sum(deviations, width);
      mu = first_mu + deviation_sum / cols;
      var = (group_sum(squares, width) - deviation_sum * deviation_sum / cols) / cols;
    } else {
      var = group_sum(squares, width) / cols;
    }
    const acc rs = inverse_std(var, eps);
    if (valid && lane_in_row == 0) {
      if constexpr (kCenter) mean[row] = mu;
      rstd[row] = rs;
    }
#pragma unroll
    for (int p = 0; p < kPacks; ++p) {
      if (owns(p)) {
        store_pack<kVec>(
            output + row * cols + col_of(p),
            normalize_pack<kVec>(row_packs[p], weight, bias, col_of(p), mu, rs));
      }
    }
  }
}

// Long rows: a block owns a row (grid-stride over rows); thread i handles
// packs i, i + blockDim.x, ... With kCached, the first sweep stores each pack
// in shared memory where the same thread reads it back (no barrier needed),
// and the variance takes a second sweep over the cached row. Without it (row
// past the cache), statistics come from one Welford sweep and the normalize
// sweep re-reads the row, which the block has just pulled through L2.
// With kAddResidual, the first sweep forms and stores the sum; what the cache
// holds, and what the uncached normalize sweep re-reads (from L2, through
// sum_out), is the sum, so neither addend is read twice.
template <bool kCenter, bool kAddResidual, typename T, typename W, int kVec, bool kCached>
__global__ void __launch_bounds__(1024) row_norm_forward_block_kernel(
    const T* __restrict__ input,
    const T* __restrict__ residual,
    T* __restrict__ sum_out,
    const W* __restrict__ weight,
    const W* __restrict__ bias,
    T* __restrict__ output,
    acc_t<T>* __restrict__ mean,
    acc_t<T>* __restrict__ rstd,
    int64_t rows,
    int64_t cols,
    double eps) {
  using acc = acc_t<T>;
  auto* cache = dynamic_shared_memory<Pack<T, kVec>>();
  __shared__ acc scratch[2 * kWarpSize];
  __shared__ Welford<acc> welford_scratch[kWarpSize];
  const int64_t packs = cols / kVec;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t row_offset = row * cols;
    acc mu = 0;
    acc var = 0;
    if constexpr (kCached) {
      acc sum[1] = {0};
      #pragma unroll 4
      for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
        const auto pack =
            load_row_pack<kAddResidual, kVec>(input, residual, sum_out, row_offset + p * kVec);
        cache[p] = pack;
#pragma unroll
        for (int v = 0; v < kVec; ++v) sum[0] += to_acc(pack.v[v]);
      }
      if constexpr (kCenter) {
        block_sum(sum, scratch);
        mu = sum[0] / cols;
        // Corrected two-pass, as in the warp kernel: the deviations' sum
        // corrects the first mean.
        acc sums[2] = {0, 0};
        for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
#pragma unroll
          for (int v = 0; v < kVec; ++v) {
            const acc d = to_acc(cache[p].v[v]) - mu;
            sums[0] += d;
            sums[1] += d * d;
          }
        }
        block_sum(sums, scratch);
        mu += sums[0] / cols;
        var = (sums[1] - sums[0] * sums[0] / cols) / cols;
      } else {
        acc squares[1] = {0};
        for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
#pragma unroll
          for (int v = 0; v < kVec; ++v) squares[0] += to_acc(cache[p].v[v]) * to_acc(cache[p].v[v]);
        }
        block_sum(squares, scratch);
        var = squares[0] / cols;
      }
    } else if constexpr (kCenter) {
      // Welford over deviations from the row's first value: a running mean of
      // values near 1e4 rounds at each update, one of deviations near the
      // spread does not, and the mean is rounded once, when the shift is
      // added back. Fused, the row's first value is the rounded sum, formed
      // here from the addends' first values (every thread needs it before
      // the sweep that stores the sum).
      const acc shift = kAddResidual
          ? to_acc(from_acc<T>(to_acc(input[row_offset]) + to_acc(residual[row_offset])))
          : to_acc(input[row_offset]);
      Welford<acc> stats{0, 0, 0};
      #pragma unroll 4
      for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
        const auto pack =
            load_row_pack<kAddResidual, kVec>(input, residual, sum_out, row_offset + p * kVec);
#pragma unroll
        for (int v = 0; v < kVec; ++v) welford_push(stats, to_acc(pack.v[v]) - shift);
      }
      stats = block_welford(stats, welford_scratch);
      mu = shift + stats.mean;
      var = stats.m2 / cols;
    } else {
      acc squares[1] = {0};
      #pragma unroll 4
      for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
        const auto pack =
            load_row_pack<kAddResidual, kVec>(input, residual, sum_out, row_offset + p * kVec);
#pragma unroll
        for (int v = 0; v < kVec; ++v) squares[0] += to_acc(pack.v[v]) * to_acc(pack.v[v]);
      }
      block_sum(squares, scratch);
      var = squares[0] / cols;
    }
    const acc rs = inverse_std(var, eps);
    if (threadIdx.x == 0) {
      if constexpr (kCenter) mean[row] = mu;
      rstd[row] = rs;
    }
    // Uncached, the sweep re-reads the row: the sum this thread stored in the
    // first sweep, when fused. Pack p is handled by thread p % blockDim.x in
    // both sweeps, so each thread reads back only its own stores, which a
    // thread always sees in program order (no barrier, no fence). The loads go
    // through sum_out, a pointer the kernel writes, so that the compiler does
    // not route them through the non-coherent read-only path.
    const T* row_source = kAddResidual ? sum_out : input;
    #pragma unroll 4
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
      const auto pack = kCached ? cache[p] : load_pack<kVec>(row_source + row_offset + p * kVec);
      store_pack<kVec>(
          output + row_offset + p * kVec,
          normalize_pack<kVec>(pack, weight, bias, p * kVec, mu, rs));
    }
  }
}

template <bool kCenter, bool kAddResidual, typename T, typename W, int kVec>
cudaError_t launch_forward(
    const T* input, const T* residual, T* sum_out, const W* weight, const W* bias, T* output,
    acc_t<T>* mean, acc_t<T>* rstd, int64_t rows, int64_t cols, double eps, cudaStream_t stream) {
  const auto p = plan(rows, cols, kVec, cols * static_cast<int64_t>(sizeof(T)));
  if (p.warp_path) {
    return with_lane_packs(p.lane_packs, [&](auto packs) {
      constexpr int kPacks = kVec > 1 ? decltype(packs)::value : 1;
      return launch(
          row_norm_forward_warp_kernel<kCenter, kAddResidual, T, W, kVec, kPacks>, p.blocks,
          p.threads, 0, stream, input, residual, sum_out, weight, bias, output, mean, rstd, rows,
          static_cast<int>(cols), p.width, eps);
    });
  }
  auto run = [&](auto kernel) {
    const cudaError_t err = allow_shared_bytes(kernel, p.cache_bytes);
    if (err != cudaSuccess) return err;
    return launch(
        kernel, p.blocks, p.threads, p.cache_bytes, stream, input, residual, sum_out, weight,
        bias, output, mean, rstd, rows, cols, eps);
  };
  return p.cached
      ? run(row_norm_forward_block_kernel<kCenter, kAddResidual, T, W, kVec, true>)
      : run(row_norm_forward_block_kernel<kCenter, kAddResidual, T, W, kVec, false>);
}

// 16-byte packs when every row of every tensor allows them, else one element
// a pack.
template <bool kCenter, bool kAddResidual, typename T, typename W>
cudaError_t forward_packed(
    const T* input, const T* residual, T* sum_out, const W* weight, const W* bias, T* output,
    acc_t<T>* mean, acc_t<T>* rstd, int64_t rows, int64_t cols, double eps, cudaStream_t stream) {
  constexpr int kVec = kVecOf<T>;
  constexpr int64_t kParamPackBytes = sizeof(W) * kVec;
  const bool vectorized = cols % kVec == 0 && is_aligned(input, 16) && is_aligned(output, 16) &&
      (!kAddResidual || (is_aligned(residual, 16) && is_aligned(sum_out, 16))) &&
      (!weight || is_aligned(weight, kParamPackBytes)) && (!bias || is_aligned(bias, kParamPackBytes));
  return vectorized
      ? launch_forward<kCenter, kAddResidual, T, W, kVec>(
            input, residual, sum_out, weight, bias, output, mean, rstd, rows, cols, eps, stream)
      : launch_forward<kCenter, kAddResidual, T, W, 1>(
            input, residual, sum_out, weight, bias, output, mean, rstd, rows, cols, eps, stream);
}

} // namespace

template <bool kCenter, typename T, typename W>
cudaError_t row_norm_forward_cuda(
    const T* input, const T* residual, T* sum_out, const W* weight, const W* bias, T* output,
    acc_t<T>* mean, acc_t<T>* rstd, int64_t rows, int64_t cols, double eps, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  return residual
      ? forward_packed<kCenter, true>(
            input, residual, sum_out, weight, bias, output, mean, rstd, rows, cols, eps, stream)
      : forward_packed<kCenter, false>(
            input, residual, sum_out, weight, bias, output, mean, rstd, rows, cols, eps, stream);
}

#define LAYERNORM_EXT_ROW_NORM_ARGS(T, W, acc) \
  const T*, const T*, T*, const W*, const W*, T*, acc*, acc*, int64_t, int64_t, double, cudaStream_t
LAYERNORM_EXT_INSTANTIATE_ROW_NORM(row_norm_forward_cuda)
#undef LAYERNORM_EXT_ROW_NORM_ARGS

} // namespace layernorm_ext::cuda
