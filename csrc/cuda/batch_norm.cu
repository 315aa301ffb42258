// BatchNorm on CUDA: per-channel reductions over N x inner values, a small
// per-channel finalize, and one elementwise sweep, for NCHW and channels-last.
//
// Reductions (training statistics: Welford; backward: sum(dy), sum(dy * xhat))
// are split over a grid whose shape depends on the tensor shape alone; every
// block writes one partial state per channel, and the finalize kernel merges
// a channel's partials in split order (Chan's merge for Welford). No atomics:
// the same bits on every run.
//  - NCHW: block (channel, split) walks its split's range of the channel's
//    N * inner values, which are `inner`-long contiguous runs; consecutive
//    threads read consecutive elements of a run (of consecutive runs when runs
//    are shorter than the block). Threads merge by a shuffle tree, then warps
//    in order.
//  - channels-last (and any input with inner == 1): the input is an
//    (N * inner) x C matrix; block (32-channel tile, split) has thread (tx, ty)
//    own channel tile * 32 + tx over rows ty, ty + 16, ... of its split, so a
//    warp reads 32 contiguous channels of a row; then the 16 row lanes merge
//    in order.
// The finalize turns a channel's statistics into the coefficients the
// elementwise sweep applies (forward: y = (x - mean) * a + b; backward:
// dx = a * (dy - b - (x - mean) * c)), so that sweep reads x (and dy) once and
// writes once, with 16-byte packs when a pack never straddles a channel
// boundary in NCHW (inner % kVec == 0) or in channels-last (C % kVec == 0).
#include "batch_norm.cuh"
#include "common.cuh"

#include <algorithm>

namespace layernorm_ext::cuda {
namespace {

constexpr int kReduceThreads = 256;
constexpr int kTileCols = 32;
constexpr int kTileRows = 16;
constexpr int kApplyThreads = 256;
constexpr int kFinalizeThreads = 128;
// Aimed number of reduction blocks, and the fewest values a split reduces.
constexpr int64_t kTargetBlocks = 1024;
constexpr int64_t kMinSplitValues = 4096;
constexpr int64_t kMaxSplits = 65535;
constexpr int64_t kMaxGridBlocks = int64_t{1} << 20;

template <typename acc>
struct Coeffs {
  acc mean;
  acc a;
  acc b;
  acc c;
};

template <typename acc>
struct GradSums {
  acc sum_dy;
  acc sum_dy_xhat;
};

template <typename acc>
__device__ __forceinline__ GradSums<acc> shfl_down(const GradSums<acc>& s, int offset) {
  return {__shfl_down_sync(kFullMask, s.sum_dy, offset),
          __shfl_down_sync(kFullMask, s.sum_dy_xhat, offset)};
}

// Training statistics of the input's values, as deviations from the
// channel's first value: a running mean of values near 1e4 rounds at every
// update, one of deviations near the spread does not (the finalize adds the
// shift back, rounding the mean once).
template <typename T>
struct StatsReducer {
  using acc = acc_t<T>;
  using State = Welford<acc>;
  struct Channel {
    acc shift;
  };
  const T* input;
  int64_t channel_stride;  // channel c's first value is input[c * channel_stride]

  __device__ static State identity() { return {0, 0, 0}; }
  __device__ Channel channel(int64_t c) const { return {to_acc(input[c * channel_stride])}; }
  __device__ void push(State& s, int64_t i, Channel ch) const { welford_push(s, to_acc(input[i]) - ch.shift); }
  __device__ static State merge(const State& a, const State& b) { return welford_merge(a, b); }
};

// sum(dy) and sum(dy * xhat) with the saved statistics.
template <typename T>
struct GradReducer {
  using acc = acc_t<T>;
  using State = GradSums<acc>;
  struct Channel {
    acc mean;
    acc rstd;
  };
  const T* grad_output;
  const T* input;
  const acc* mean;
  const acc* rstd;

  __device__ static State identity() { return {0, 0}; }
  __device__ Channel channel(int64_t c) const { return {mean[c], rstd[c]}; }
  __device__ void push(State& s, int64_t i, const Channel& ch) const {
    const acc dy = to_acc(grad_output[i]);
    s.sum_dy += dy;
    s.sum_dy_xhat += dy * (to_acc(input[i]) - ch.mean) * ch.rstd;
  }
  __device__ static State merge(const State& a, const State& b) {
    return {a.sum_dy + b.sum_dy, a.sum_dy_xhat + b.sum_dy_xhat};
  }
};

// Partial states are laid out [channel][split].
template <typename Reducer>
__global__ void __launch_bounds__(kReduceThreads) channel_reduce_nchw_kernel(
    Reducer reducer,
    typename Reducer::State* __restrict__ partials,
    int64_t batch,
    int64_t channels,
    int64_t inner,
    int64_t split_values) {
  using State = typename Reducer::State;
  __shared__ State scratch[kWarpSize];
  const int64_t c = blockIdx.x;
  const int64_t begin = blockIdx.y * split_values;
  const int64_t end = std::min(batch * inner, begin + split_values);
  const auto ch = reducer.channel(c);
  State s = Reducer::identity();
  if (inner >= blockDim.x) {
    // Long runs: walk them one sample at a time, no index division.
    for (int64_t n = begin / inner; n < batch && n * inner < end; ++n) {
      const int64_t run_begin = std::max<int64_t>(begin - n * inner, 0);
      const int64_t run_end = std::min(end - n * inner, inner);
      const int64_t base = (n * channels + c) * inner;
      for (int64_t j = run_begin + threadIdx.x; j < run_end; j += blockDim.x) {
        reducer.push(s, base + j, ch);
      }
    }
  } else {
    // Short runs (small spatial size): one value a thread across samples, so
    // that threads do not idle past the end of each run.
    for (int64_t k = begin + threadIdx.x; k < end; k += blockDim.x) {
      const int64_t n = k / inner;
      reducer.push(s, (n * channels + c) * inner + (k - n * inner), ch);
    }
  }
  s = block_merge(s, scratch, [](const State& a, const State& b) { return Reducer::merge(a, b); });
  if (threadIdx.x == 0) partials[c * gridDim.y + blockIdx.y] = s;
}

template <typename Reducer>
__global__ void __launch_bounds__(kTileCols * kTileRows) channel_reduce_channels_last_kernel(
    Reducer reducer,
    typename Reducer::State* __restrict__ partials,
    int64_t rows,
    int64_t channels,
    int64_t split_rows) {
  using State = typename Reducer::State;
  __shared__ State tile[kTileRows][kTileCols];
  const int64_t c = blockIdx.x * int64_t{kTileCols} + threadIdx.x;
  const int64_t begin = blockIdx.y * split_rows;
  const int64_t end = std::min(rows, begin + split_rows);
  State s = Reducer::identity();
  if (c < channels) {
    const auto ch = reducer.channel(c);
    for (int64_t r = begin + threadIdx.y; r < end; r += kTileRows) reducer.push(s, r * channels + c, ch);
  }
  tile[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < channels) {
    State total = tile[0][threadIdx.x];
    for (int i = 1; i < kTileRows; ++i) total = Reducer::merge(total, tile[i][threadIdx.x]);
    partials[c * gridDim.y + blockIdx.y] = total;
  }
}

int64_t reduce_splits(const BatchNormLayout& layout) {
  const int64_t values = layout.batch * layout.inner;
  if (values == 0 || layout.channels == 0) return 0;
  const int64_t channel_blocks =
      layout.channels_last ? (layout.channels + kTileCols - 1) / kTileCols : layout.channels;
  const int64_t by_blocks = std::max<int64_t>(1, kTargetBlocks / channel_blocks);
  const int64_t by_values = (values + kMinSplitValues - 1) / kMinSplitValues;
  return std::min({by_blocks, by_values, kMaxSplits});
}

template <typename Reducer>
cudaError_t launch_reduce(
    const Reducer& reducer, typename Reducer::State* partials, const BatchNormLayout& layout,
    int64_t splits, cudaStream_t stream) {
  if (splits == 0) return cudaSuccess;
  const int64_t values = layout.batch * layout.inner;
  const int64_t split_values = (values + splits - 1) / splits;
  if (layout.channels_last) {
    const dim3 grid(static_cast<unsigned>((layout.channels + kTileCols - 1) / kTileCols),
                    static_cast<unsigned>(splits));
    return launch(
        channel_reduce_channels_last_kernel<Reducer>, grid, dim3(kTileCols, kTileRows), 0, stream,
        reducer, partials, values, layout.channels, split_values);
  }
  const dim3 grid(static_cast<unsigned>(layout.channels), static_cast<unsigned>(splits));
  return launch(
      channel_reduce_nchw_kernel<Reducer>, grid, kReduceThreads, 0, stream, reducer, partials,
      layout.batch, layout.channels, layout.inner, split_values);
}

// One thread a channel from here on: [C]-sized work.
template <typename T, typename acc = acc_t<T>>
__global__ void __launch_bounds__(kFinalizeThreads) training_stats_finalize_kernel(
    const T* __restrict__ input,
    int64_t channel_stride,
    const Welford<acc>* __restrict__ partials,
    int64_t splits,
    const acc* __restrict__ weight,
    const acc* __restrict__ bias,
    const acc* __restrict__ running_mean,
    const acc* __restrict__ running_var,
    acc* __restrict__ save_mean,
    acc* __restrict__ save_rstd,
    acc* __restrict__ new_running_mean,
    acc* __restrict__ new_running_var,
    Coeffs<acc>* __restrict__ coeffs,
    int64_t channels,
    acc momentum,
    double eps) {
  for (int64_t c = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; c < channels;
       c += int64_t{gridDim.x} * blockDim.x) {
    Welford<acc> s{0, 0, 0};
    for (int64_t k = 0; k < splits; ++k) s = welford_merge(s, partials[c * splits + k]);
    // An empty batch (no partials: s stays zero) has mean 0 and variance 0,
    // and leaves the running stats as they are, as the CPU kernels and torch
    // do; one value has no unbiased variance and leaves running_var.
    const acc count = static_cast<acc>(s.count);
    // The partials are of deviations from the channel's first value
    // (StatsReducer), which an empty batch does not have.
    const acc mean = s.count > 0
        ? static_cast<acc>(static_cast<double>(to_acc(input[c * channel_stride])) + s.mean)
        : acc(0);
    const acc var = s.count > 0 ? s.m2 / count : acc(0);
    const acc rstd = inverse_std(var, eps);
    save_mean[c] = mean;
    save_rstd[c] = rstd;
    if (running_mean) {
      new_running_mean[c] = s.count > 0
          ? momentum * mean + (acc(1) - momentum) * running_mean[c]
          : running_mean[c];
    }
    if (running_var) {
      const acc unbiased_var = s.count > 1 ? s.m2 / (count - acc(1)) : running_var[c];
      new_running_var[c] = s.count > 0
          ? momentum * unbiased_var + (acc(1) - momentum) * running_var[c]
          : running_var[c];
    }
    coeffs[c] = {mean, weight ? rstd * weight[c] : rstd, bias ? bias[c] : acc(0), acc(0)};
  }
}

template <typename acc>
__global__ void __launch_bounds__(kFinalizeThreads) eval_stats_kernel(
    const acc* __restrict__ weight,
    const acc* __restrict__ bias,
    const acc* __restrict__ running_mean,
    const acc* __restrict__ running_var,
    acc* __restrict__ save_mean,
    acc* __restrict__ save_rstd,
    Coeffs<acc>* __restrict__ coeffs,
    int64_t channels,
    double eps) {
  for (int64_t c = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; c < channels;
       c += int64_t{gridDim.x} * blockDim.x) {
    const acc mean = running_mean[c];
    const acc rstd = inverse_std(running_var[c], eps);
    save_mean[c] = mean;
    save_rstd[c] = rstd;
    coeffs[c] = {mean, weight ? rstd * weight[c] : rstd, bias ? bias[c] : acc(0), acc(0)};
  }
}

template <typename acc>
__global__ void __launch_bounds__(kFinalizeThreads) grad_finalize_kernel(
    const GradSums<acc>* __restrict__ partials,
    int64_t splits,
    const acc* __restrict__ weight,
    const acc* __restrict__ save_mean,
    const acc* __restrict__ save_rstd,
    bool training,
    acc* __restrict__ grad_weight,
    acc* __restrict__ grad_bias,
    Coeffs<acc>* __restrict__ coeffs,
    int64_t channels,
    acc inv_count) {
  for (int64_t c = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; c < channels;
       c += int64_t{gridDim.x} * blockDim.x) {
    // The splits' partials (up to kMaxSplits) are added in double, rounded once.
    GradSums<double> total{0, 0};
    for (int64_t k = 0; k < splits; ++k) {
      total.sum_dy += partials[c * splits + k].sum_dy;
      total.sum_dy_xhat += partials[c * splits + k].sum_dy_xhat;
    }
    const GradSums<acc> s{static_cast<acc>(total.sum_dy), static_cast<acc>(total.sum_dy_xhat)};
    if (grad_weight) grad_weight[c] = s.sum_dy_xhat;
    if (grad_bias) grad_bias[c] = s.sum_dy;
    const acc rstd = save_rstd[c];
    coeffs[c] = {save_mean[c], weight ? weight[c] * rstd : rstd,
                 training ? s.sum_dy * inv_count : acc(0),
                 training ? rstd * s.sum_dy_xhat * inv_count : acc(0)};
  }
}

// Grid-stride over packs of kVec elements; a pack's channel is one (NCHW) or
// kVec consecutive ones (channels-last).
template <typename T, int kVec, bool kChannelsLast, bool kBackward>
__global__ void __launch_bounds__(kApplyThreads) channel_apply_kernel(
    const T* __restrict__ input,
    const T* __restrict__ grad_output,
    const Coeffs<acc_t<T>>* __restrict__ coeffs,
    T* __restrict__ out,
    int64_t numel,
    int64_t channels,
    int64_t inner) {
  using acc = acc_t<T>;
  const int64_t packs = numel / kVec;
  for (int64_t q = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; q < packs;
       q += int64_t{gridDim.x} * blockDim.x) {
    const int64_t i = q * kVec;
    const auto x = load_pack<kVec>(input + i);
    Pack<T, kVec> dy;
    if constexpr (kBackward) dy = load_pack<kVec>(grad_output + i);
    const int64_t first_channel = kChannelsLast ? i % channels : (i / inner) % channels;
    Pack<T, kVec> result;
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      const Coeffs<acc> k = coeffs[kChannelsLast ? first_channel + v : first_channel];
      const acc centered = to_acc(x.v[v]) - k.mean;
      if constexpr (kBackward) {
        result.v[v] = from_acc<T>(k.a * (to_acc(dy.v[v]) - k.b - centered * k.c));
      } else {
        result.v[v] = from_acc<T>(centered * k.a + k.b);
      }
    }
    store_pack<kVec>(out + i, result);
  }
}

template <bool kBackward, typename T>
cudaError_t launch_apply(
    const T* input, const T* grad_output, const Coeffs<acc_t<T>>* coeffs, T* out,
    const BatchNormLayout& layout, cudaStream_t stream) {
  const int64_t numel = layout.batch * layout.channels * layout.inner;
  if (numel == 0) return cudaSuccess;
  constexpr int kVec = kVecOf<T>;
  const bool vectorized = (layout.channels_last ? layout.channels : layout.inner) % kVec == 0 &&
      is_aligned(input, 16) && is_aligned(out, 16) && (!kBackward || is_aligned(grad_output, 16));
  auto run = [&](auto kernel, int vec) {
    const int64_t packs = numel / vec;
    const int64_t blocks = std::min((packs + kApplyThreads - 1) / kApplyThreads, kMaxGridBlocks);
    return launch(
        kernel, blocks, kApplyThreads, 0, stream, input, grad_output, coeffs, out, numel,
        layout.channels, layout.inner);
  };
  if (layout.channels_last) {
    return vectorized ? run(channel_apply_kernel<T, kVec, true, kBackward>, kVec)
                      : run(channel_apply_kernel<T, 1, true, kBackward>, 1);
  }
  return vectorized ? run(channel_apply_kernel<T, kVec, false, kBackward>, kVec)
                    : run(channel_apply_kernel<T, 1, false, kBackward>, 1);
}

int64_t finalize_blocks(int64_t channels) {
  return std::max<int64_t>(1, std::min((channels + kFinalizeThreads - 1) / kFinalizeThreads, kMaxGridBlocks));
}

// Workspace: the [C] coefficients, then the [C][splits] partial states.
template <typename T>
Coeffs<acc_t<T>>* workspace_coeffs(void* workspace) {
  return static_cast<Coeffs<acc_t<T>>*>(workspace);
}

template <typename State, typename T>
State* workspace_partials(void* workspace, const BatchNormLayout& layout) {
  return reinterpret_cast<State*>(workspace_coeffs<T>(workspace) + layout.channels);
}

} // namespace

template <typename T>
int64_t batch_norm_workspace_bytes(const BatchNormLayout& layout) {
  using acc = acc_t<T>;
  const int64_t state_bytes = std::max(sizeof(Welford<acc>), sizeof(GradSums<acc>));
  return layout.channels * static_cast<int64_t>(sizeof(Coeffs<acc>)) +
      layout.channels * reduce_splits(layout) * state_bytes;
}

template <typename T>
cudaError_t batch_norm_forward_training_cuda(
    const T* input, const acc_t<T>* weight, const acc_t<T>* bias, const acc_t<T>* running_mean,
    const acc_t<T>* running_var, T* output, acc_t<T>* save_mean, acc_t<T>* save_rstd,
    acc_t<T>* new_running_mean, acc_t<T>* new_running_var, double momentum, double eps,
    const BatchNormLayout& layout, void* workspace, cudaStream_t stream) {
  using acc = acc_t<T>;
  if (layout.channels == 0) return cudaSuccess;
  const int64_t splits = reduce_splits(layout);
  auto* partials = workspace_partials<Welford<acc>, T>(workspace, layout);
  auto* coeffs = workspace_coeffs<T>(workspace);
  const int64_t channel_stride = layout.channels_last ? 1 : layout.inner;
  cudaError_t err = launch_reduce(StatsReducer<T>{input, channel_stride}, partials, layout, splits, stream);
  if (err != cudaSuccess) return err;
  err = launch(
      training_stats_finalize_kernel<T>, finalize_blocks(layout.channels), kFinalizeThreads, 0,
      stream, input, channel_stride, partials, splits, weight, bias, running_mean, running_var,
      save_mean, save_rstd, new_running_mean, new_running_var, coeffs, layout.channels,
      static_cast<acc>(momentum), eps);
  if (err != cudaSuccess) return err;
  return launch_apply<false>(input, static_cast<const T*>(nullptr), coeffs, output, layout, stream);
}

template <typename T>
cudaError_t batch_norm_forward_eval_cuda(
    const T* input, const acc_t<T>* weight, const acc_t<T>* bias, const acc_t<T>* running_mean,
    const acc_t<T>* running_var, T* output, acc_t<T>* save_mean, acc_t<T>* save_rstd, double eps,
    const BatchNormLayout& layout, void* workspace, cudaStream_t stream) {
  using acc = acc_t<T>;
  if (layout.channels == 0) return cudaSuccess;
  auto* coeffs = workspace_coeffs<T>(workspace);
  const cudaError_t err = launch(
      eval_stats_kernel<acc>, finalize_blocks(layout.channels), kFinalizeThreads, 0, stream,
      weight, bias, running_mean, running_var, save_mean, save_rstd, coeffs, layout.channels, eps);
  if (err != cudaSuccess) return err;
  return launch_apply<false>(input, static_cast<const T*>(nullptr), coeffs, output, layout, stream);
}

template <typename T>
cudaError_t batch_norm_backward_cuda(
    const T* grad_output, const T* input, const acc_t<T>* weight, const acc_t<T>* save_mean,
    const acc_t<T>* save_rstd, bool training, T* grad_input, acc_t<T>* grad_weight,
    acc_t<T>* grad_bias, const BatchNormLayout& layout, void* workspace, cudaStream_t stream) {
  using acc = acc_t<T>;
  if (layout.channels == 0) return cudaSuccess;
  const bool reduce = grad_weight || grad_bias || (grad_input && training);
  const int64_t splits = reduce ? reduce_splits(layout) : 0;
  auto* partials = workspace_partials<GradSums<acc>, T>(workspace, layout);
  auto* coeffs = workspace_coeffs<T>(workspace);
  cudaError_t err = launch_reduce(
      GradReducer<T>{grad_output, input, save_mean, save_rstd}, partials, layout, splits, stream);
  if (err != cudaSuccess) return err;
  const int64_t count = layout.batch * layout.inner;
  err = launch(
      grad_finalize_kernel<acc>, finalize_blocks(layout.channels), kFinalizeThreads, 0, stream,
      partials, splits, weight, save_mean, save_rstd, training, grad_weight, grad_bias, coeffs,
      layout.channels, count > 0 ? acc(1) / static_cast<acc>(count) : acc(0));
  if (err != cudaSuccess || !grad_input) return err;
  return launch_apply<true>(input, grad_output, coeffs, grad_input, layout, stream);
}

#define LAYERNORM_EXT_INSTANTIATE_BATCH_NORM(T)                                               \
  template int64_t batch_norm_workspace_bytes<T>(const BatchNormLayout&);                     \
  template cudaError_t batch_norm_forward_training_cuda<T>(                                   \
      const T*, const acc_t<T>*, const acc_t<T>*, const acc_t<T>*, const acc_t<T>*, T*,       \
      acc_t<T>*, acc_t<T>*, acc_t<T>*, acc_t<T>*, double, double, const BatchNormLayout&,     \
      void*, cudaStream_t);                                                                   \
  template cudaError_t batch_norm_forward_eval_cuda<T>(                                       \
      const T*, const acc_t<T>*, const acc_t<T>*, const acc_t<T>*, const acc_t<T>*, T*,       \
      acc_t<T>*, acc_t<T>*, double, const BatchNormLayout&, void*, cudaStream_t);             \
  template cudaError_t batch_norm_backward_cuda<T>(                                           \
      const T*, const T*, const acc_t<T>*, const acc_t<T>*, const acc_t<T>*, bool, T*,        \
      acc_t<T>*, acc_t<T>*, const BatchNormLayout&, void*, cudaStream_t);
LAYERNORM_EXT_INSTANTIATE_BATCH_NORM(float)
LAYERNORM_EXT_INSTANTIATE_BATCH_NORM(double)
LAYERNORM_EXT_INSTANTIATE_BATCH_NORM(__half)
LAYERNORM_EXT_INSTANTIATE_BATCH_NORM(__nv_bfloat16)
#undef LAYERNORM_EXT_INSTANTIATE_BATCH_NORM

} // namespace layernorm_ext::cuda
