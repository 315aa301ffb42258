// LayerNorm / RMSNorm backward on CUDA: one template for both (kCenter).
//
// grad_input: with g = grad_output * weight and xhat = (x - mean) * rstd,
//   dx = rstd * (g - (sum(g) + xhat * sum(g * xhat)) / cols)
// (RMSNorm: mean = 0 and no sum(g) term). Rows map onto threads as in the
// forward (row_norm_plan.cuh): both row sums come from one sweep over x and
// grad_output, and dx from a second sweep over the registers, the shared
// memory cache or (very long rows) L2.
//
// grad_weight = sum over rows of grad_output * xhat, grad_bias = sum of
// grad_output: column sums, computed apart from dx by a column-tiled kernel
// whose blocks each own a tile of 32 columns and a chunk of rows and write
// one fp32 partial row per chunk; a second small kernel adds the partials of
// each column in chunk order. The chunking depends on the shape only: no
// atomics, the same bits on every run.
#include "row_norm.cuh"
#include "row_norm_plan.cuh"

namespace layernorm_ext::cuda {
namespace {

using namespace row_plan;

constexpr int kTileCols = 32;
constexpr int kTileRows = 16;
// Aimed number of blocks of the partial-sum kernel, and the fewest rows a
// chunk sums (kTileRows threads, several rows each).
constexpr int64_t kParamGradBlocks = 1024;
constexpr int64_t kMinChunkRows = kTileRows * 4;
constexpr int64_t kMaxChunks = 65535;

int64_t param_grad_chunks(int64_t rows, int64_t cols) {
  if (rows == 0 || cols == 0) return 0;
  const int64_t col_tiles = (cols + kTileCols - 1) / kTileCols;
  const int64_t by_blocks = std::max<int64_t>(1, kParamGradBlocks / col_tiles);
  const int64_t by_rows = (rows + kMinChunkRows - 1) / kMinChunkRows;
  return std::min({by_blocks, by_rows, kMaxChunks});
}

// Adds one pack's terms to sum(g) and sum(g * xhat).
template <int kVec, typename T, typename W, typename acc>
__device__ __forceinline__ void add_row_sums(
    const Pack<T, kVec>& x, const Pack<T, kVec>& dy, const W* weight, int64_t col, acc mu,
    acc rs, acc& sum_g, acc& sum_g_xhat) {
  Pack<W, kVec> w_pack;
  if (weight) w_pack = load_pack<kVec>(weight + col);
#pragma unroll
  for (int v = 0; v < kVec; ++v) {
    const acc g = weight ? to_acc(dy.v[v]) * to_acc(w_pack.v[v]) : to_acc(dy.v[v]);
    sum_g += g;
    sum_g_xhat += g * (to_acc(x.v[v]) - mu) * rs;
  }
}

template <bool kCenter, int kVec, typename T, typename W, typename acc>
__device__ __forceinline__ Pack<T, kVec> grad_input_pack(
    const Pack<T, kVec>& x, const Pack<T, kVec>& dy, const W* weight, int64_t col, acc mu,
    acc rs, acc sum_g, acc sum_g_xhat, acc inv_cols) {
  Pack<W, kVec> w_pack;
  if (weight) w_pack = load_pack<kVec>(weight + col);
  const acc centered_sum_g = kCenter ? sum_g : acc(0);
  Pack<T, kVec> out;
#pragma unroll
  for (int v = 0; v < kVec; ++v) {
    const acc g = weight ? to_acc(dy.v[v]) * to_acc(w_pack.v[v]) : to_acc(dy.v[v]);
    const acc xhat = (to_acc(x.v[v]) - mu) * rs;
    out.v[v] = from_acc<T>(rs * (g - (centered_sum_g + xhat * sum_g_xhat) * inv_cols));
  }
  return out;
}

// Short and mid rows: `width` lanes own a row and hold its x and grad_output
// packs in registers (layout as in the forward's warp kernel).
template <bool kCenter, typename T, typename W, int kVec, int kPacks>
__global__ void __launch_bounds__(kWarpBlockThreads) row_norm_grad_input_warp_kernel(
    const T* __restrict__ grad_output,
    const T* __restrict__ input,
    const acc_t<T>* __restrict__ mean,
    const acc_t<T>* __restrict__ rstd,
    const W* __restrict__ weight,
    T* __restrict__ grad_input,
    int64_t rows,
    int cols,
    int width) {
  using acc = acc_t<T>;
  const int lane = threadIdx.x % kWarpSize;
  const int lane_in_row = lane % width;
  const int rows_per_warp = kWarpSize / width;
  const int64_t warps_per_block = blockDim.x / kWarpSize;
  const int64_t warp = blockIdx.x * warps_per_block + threadIdx.x / kWarpSize;
  const int64_t warp_step = gridDim.x * warps_per_block * rows_per_warp;
  const acc inv_cols = acc(1) / cols;
  for (int64_t first = warp * rows_per_warp; first < rows; first += warp_step) {
    const int64_t row = first + lane / width;
    const bool valid = row < rows;
    const int64_t offset = (valid ? row : 0) * cols;
    auto col_of = [&](int p) { return (p * width + lane_in_row) * kVec; };
    auto owns = [&](int p) { return valid && col_of(p) < cols; };
    const acc mu = kCenter && valid ? mean[row] : acc(0);
    const acc rs = valid ? rstd[row] : acc(0);

    Pack<T, kVec> x_packs[kPacks], dy_packs[kPacks];
    acc sum_g = 0, sum_g_xhat = 0;
#pragma unroll
    for (int p = 0; p < kPacks; ++p) {
      if (owns(p)) {
        x_packs[p] = load_pack<kVec>(input + offset + col_of(p));
        dy_packs[p] = load_pack<kVec>(grad_output + offset + col_of(p));
        add_row_sums(x_packs[p], dy_packs[p], weight, col_of(p), mu, rs, sum_g, sum_g_xhat);
      }
    }
    sum_g = group_sum(sum_g, width);
    sum_g_xhat = group_sum(sum_g_xhat, width);
#pragma unroll
    for (int p = 0; p < kPacks; ++p) {
      if (owns(p)) {
        store_pack<kVec>(
            grad_input + offset + col_of(p),
            grad_input_pack<kCenter>(
                x_packs[p], dy_packs[p], weight, col_of(p), mu, rs, sum_g, sum_g_xhat, inv_cols));
      }
    }
  }
}

// Long rows: a block owns a row; thread i handles packs i, i + blockDim.x, ...
// With kCached the first sweep keeps x and grad_output in shared memory (each
// thread reads back only what it wrote), else the second sweep re-reads them
// from L2.
template <bool kCenter, typename T, typename W, int kVec, bool kCached>
__global__ void __launch_bounds__(1024) row_norm_grad_input_block_kernel(
    const T* __restrict__ grad_output,
    const T* __restrict__ input,
    const acc_t<T>* __restrict__ mean,
    const acc_t<T>* __restrict__ rstd,
    const W* __restrict__ weight,
    T* __restrict__ grad_input,
    int64_t rows,
    int64_t cols) {
  using acc = acc_t<T>;
  const int64_t packs = cols / kVec;
  auto* x_cache = dynamic_shared_memory<Pack<T, kVec>>();
  auto* dy_cache = x_cache + packs;
  __shared__ acc scratch[2 * kWarpSize];
  const acc inv_cols = acc(1) / cols;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t offset = row * cols;
    const acc mu = kCenter ? mean[row] : acc(0);
    const acc rs = rstd[row];
    acc sums[2] = {0, 0};
    #pragma unroll 4
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
      const auto x = load_pack<kVec>(input + offset + p * kVec);
      const auto dy = load_pack<kVec>(grad_output + offset + p * kVec);
      if constexpr (kCached) {
        x_cache[p] = x;
        dy_cache[p] = dy;
      }
      add_row_sums(x, dy, weight, p * kVec, mu, rs, sums[0], sums[1]);
    }
    block_sum(sums, scratch);
    #pragma unroll 4
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
      const auto x = kCached ? x_cache[p] : load_pack<kVec>(input + offset + p * kVec);
      const auto dy = kCached ? dy_cache[p] : load_pack<kVec>(grad_output + offset + p * kVec);
      store_pack<kVec>(
          grad_input + offset + p * kVec,
          grad_input_pack<kCenter>(x, dy, weight, p * kVec, mu, rs, sums[0], sums[1], inv_cols));
    }
  }
}

// Block (column tile, row chunk): thread (tx, ty) sums column tile * 32 + tx
// over rows ty, ty + 16, ... of the chunk (a warp reads 32 contiguous
// elements of a row), then thread ty = 0 adds the 16 row lanes in order.
template <bool kCenter, typename T>
__global__ void __launch_bounds__(kTileCols * kTileRows) row_norm_param_grad_partial_kernel(
    const T* __restrict__ grad_output,
    const T* __restrict__ input,
    const acc_t<T>* __restrict__ mean,
    const acc_t<T>* __restrict__ rstd,
    acc_t<T>* __restrict__ grad_weight_partial,
    acc_t<T>* __restrict__ grad_bias_partial,
    int64_t rows,
    int64_t cols,
    int64_t rows_per_chunk) {
  using acc = acc_t<T>;
  __shared__ acc sums[2][kTileRows][kTileCols + 1];
  const int64_t col = blockIdx.x * int64_t{kTileCols} + threadIdx.x;
  const int64_t row_begin = blockIdx.y * rows_per_chunk;
  const int64_t row_end = std::min(rows, row_begin + rows_per_chunk);
  acc dweight = 0, dbias = 0;
  if (col < cols) {
    for (int64_t row = row_begin + threadIdx.y; row < row_end; row += kTileRows) {
      const acc mu = kCenter ? mean[row] : acc(0);
      const acc dy = to_acc(grad_output[row * cols + col]);
      dweight += dy * (to_acc(input[row * cols + col]) - mu) * rstd[row];
      dbias += dy;
    }
  }
  sums[0][threadIdx.y][threadIdx.x] = dweight;
  sums[1][threadIdx.y][threadIdx.x] = dbias;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    acc total_dweight = 0, total_dbias = 0;
    for (int i = 0; i < kTileRows; ++i) {
      total_dweight += sums[0][i][threadIdx.x];
      total_dbias += sums[1][i][threadIdx.x];
    }
    if (grad_weight_partial) grad_weight_partial[blockIdx.y * cols + col] = total_dweight;
    if (grad_bias_partial) grad_bias_partial[blockIdx.y * cols + col] = total_dbias;
  }
}

// One thread a column: adds the chunk partials in chunk order, in double (up
// to kMaxChunks of them: a float32 chain of that many adds would round at
// the total's magnitude each time).
template <typename W, typename acc>
__global__ void row_norm_param_grad_finish_kernel(
    const acc* __restrict__ grad_weight_partial,
    const acc* __restrict__ grad_bias_partial,
    W* __restrict__ grad_weight,
    W* __restrict__ grad_bias,
    int64_t chunks,
    int64_t cols) {
  for (int64_t col = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; col < cols;
       col += int64_t{gridDim.x} * blockDim.x) {
    double dweight = 0, dbias = 0;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      if (grad_weight) dweight += grad_weight_partial[chunk * cols + col];
      if (grad_bias) dbias += grad_bias_partial[chunk * cols + col];
    }
    if (grad_weight) grad_weight[col] = from_acc<W>(static_cast<acc>(dweight));
    if (grad_bias) grad_bias[col] = from_acc<W>(static_cast<acc>(dbias));
  }
}

template <bool kCenter, typename T, typename W, int kVec>
cudaError_t launch_grad_input(
    const T* grad_output, const T* input, const acc_t<T>* mean, const acc_t<T>* rstd,
    const W* weight, T* grad_input, int64_t rows, int64_t cols, cudaStream_t stream) {
  const auto p = plan(rows, cols, kVec, 2 * cols * static_cast<int64_t>(sizeof(T)));
  if (p.warp_path) {
    return with_lane_packs(p.lane_packs, [&](auto packs) {
      constexpr int kPacks = kVec > 1 ? decltype(packs)::value : 1;
      return launch(
          row_norm_grad_input_warp_kernel<kCenter, T, W, kVec, kPacks>, p.blocks, p.threads, 0,
          stream, grad_output, input, mean, rstd, weight, grad_input, rows,
          static_cast<int>(cols), p.width);
    });
  }
  auto run = [&](auto kernel) {
    const cudaError_t err = allow_shared_bytes(kernel, p.cache_bytes);
    if (err != cudaSuccess) return err;
    return launch(
        kernel, p.blocks, p.threads, p.cache_bytes, stream, grad_output, input, mean, rstd,
        weight, grad_input, rows, cols);
  };
  return p.cached ? run(row_norm_grad_input_block_kernel<kCenter, T, W, kVec, true>)
                  : run(row_norm_grad_input_block_kernel<kCenter, T, W, kVec, false>);
}

template <bool kCenter, typename T, typename W>
cudaError_t launch_param_grads(
    const T* grad_output, const T* input, const acc_t<T>* mean, const acc_t<T>* rstd,
    W* grad_weight, W* grad_bias, acc_t<T>* workspace, int64_t rows, int64_t cols,
    cudaStream_t stream) {
  if (cols == 0) return cudaSuccess;
  const int64_t chunks = param_grad_chunks(rows, cols);
  acc_t<T>* dweight_partial = grad_weight ? workspace : nullptr;
  acc_t<T>* dbias_partial = grad_bias ? workspace + (grad_weight ? chunks * cols : 0) : nullptr;
  if (chunks > 0) {
    const int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
    const dim3 grid(static_cast<unsigned>((cols + kTileCols - 1) / kTileCols), static_cast<unsigned>(chunks));
    const cudaError_t err = launch(
        row_norm_param_grad_partial_kernel<kCenter, T>, grid, dim3(kTileCols, kTileRows), 0,
        stream, grad_output, input, mean, rstd, dweight_partial, dbias_partial, rows, cols,
        rows_per_chunk);
    if (err != cudaSuccess) return err;
  }
  constexpr int kThreads = 256;
  const int64_t blocks = std::min((cols + kThreads - 1) / kThreads, kMaxGridBlocks);
  return launch(
      row_norm_param_grad_finish_kernel<W, acc_t<T>>, blocks, kThreads, 0, stream,
      dweight_partial, dbias_partial, grad_weight, grad_bias, chunks, cols);
}

} // namespace

int64_t row_norm_backward_workspace_size(int64_t rows, int64_t cols, bool grad_weight, bool grad_bias) {
  return param_grad_chunks(rows, cols) * cols * ((grad_weight ? 1 : 0) + (grad_bias ? 1 : 0));
}

template <bool kCenter, typename T, typename W>
cudaError_t row_norm_backward_cuda(
    const T* grad_output, const T* input, const acc_t<T>* mean, const acc_t<T>* rstd,
    const W* weight, T* grad_input, W* grad_weight, W* grad_bias, acc_t<T>* workspace,
    int64_t rows, int64_t cols, cudaStream_t stream) {
  if (grad_input && rows > 0) {
    constexpr int kVec = kVecOf<T>;
    const bool vectorized = cols % kVec == 0 && is_aligned(grad_output, 16) &&
        is_aligned(input, 16) && is_aligned(grad_input, 16) &&
        (!weight || is_aligned(weight, static_cast<int64_t>(sizeof(W)) * kVec));
    const cudaError_t err = vectorized
        ? launch_grad_input<kCenter, T, W, kVec>(
              grad_output, input, mean, rstd, weight, grad_input, rows, cols, stream)
        : launch_grad_input<kCenter, T, W, 1>(
              grad_output, input, mean, rstd, weight, grad_input, rows, cols, stream);
    if (err != cudaSuccess) return err;
  }
  if (!grad_weight && !grad_bias) return cudaSuccess;
  return launch_param_grads<kCenter>(
      grad_output, input, mean, rstd, grad_weight, grad_bias, workspace, rows, cols, stream);
}

#define LAYERNORM_EXT_ROW_NORM_ARGS(T, W, acc)                                              \
  const T*, const T*, const acc*, const acc*, const W*, T*, W*, W*, acc*, int64_t, int64_t, \
      cudaStream_t
LAYERNORM_EXT_INSTANTIATE_ROW_NORM(row_norm_backward_cuda)
#undef LAYERNORM_EXT_ROW_NORM_ARGS

} // namespace layernorm_ext::cuda
