// Row-wise normalization kernels on the CPU, shared by LayerNorm
// (kCenter = true: subtract the row mean) and RMSNorm (kCenter = false).
//
// The input is a matrix of `rows` x `cols` contiguous elements; each row is
// normalized on its own: y = (x - mean) * rstd * weight + bias, with
// rstd = 1 / sqrt(mean((x - mean)^2) + eps) (RMSNorm: mean = 0, no bias).
//
// Work split: a task owns whole rows, so a row's statistics are summed in one
// fixed order by one thread, and the result has the same bits whatever the
// thread count. Rows go to threads through at::parallel_for (torch's OpenMP
// pool, so torch.set_num_threads applies), with a grain of kGrainElements
// elements so that small inputs run inline without waking threads.
//
// Memory: a half/bfloat16 row is converted to acc_t once into a per-task
// buffer; the statistics sweeps and the normalize sweep then read it from
// L1/L2, so the row is read from memory once and written once. Variance is
// two-pass (a shifted mean first, then squared deviations), which stays exact
// for rows whose mean is large against their spread, unlike E[x^2] - E[x]^2.
//
// Backward: the gradients of weight and bias are sums over rows. Rows are cut
// into a number of blocks that depends on the shape alone; a task owns whole
// blocks and sums its rows' contributions into the block's own partial row,
// in row order; the partials are then added in block order. No atomics, and
// the bits do not depend on the thread count.
#pragma once

#include "dispatch.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace layernorm_ext::cpu {

// Smallest piece of work (in elements) worth handing to a thread.
constexpr int64_t kGrainElements = 1 << 15;
// Sums run over chunks of this many elements, each summed with SIMD lanes,
// and the chunk sums are added in order: the rounding error of a long row
// grows with the number of chunks, not with the row length.
constexpr int64_t kSumChunk = 512;
// Bounds on the partial rows of the weight/bias gradients.
constexpr int64_t kMaxGradBlocks = 64;
constexpr int64_t kMaxGradPartialBytes = int64_t{32} << 20;

// Sum of term(j) for j in [0, n), in a fixed order.
template <typename acc, typename Term>
inline acc chunked_sum(int64_t n, const Term& term) {
  acc total = 0;
  for (int64_t start = 0; start < n; start += kSumChunk) {
    const int64_t end = std::min(n, start + kSumChunk);
    acc chunk = 0;
#pragma omp simd reduction(+ : chunk)
    for (int64_t j = start; j < end; ++j) chunk += term(j);
    total += chunk;
  }
  return total;
}

// Returns the row as acc_t values: the row itself when T is acc_t, otherwise
// converted into `buffer`.
template <typename T>
inline const acc_t<T>* row_as_acc(const T* row, int64_t cols, std::vector<acc_t<T>>& buffer) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    return row;
  } else {
    buffer.resize(cols);
    for (int64_t j = 0; j < cols; ++j) buffer[j] = static_cast<acc_t<T>>(row[j]);
    return buffer.data();
  }
}

inline int64_t grain_rows(int64_t cols) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(cols, 1));
}

// weight and bias may be null (no affine); mean is unused when !kCenter.
template <bool kCenter, typename T, typename W>
void row_norm_forward(
    const T* input,
    const W* weight,
    const W* bias,
    T* output,
    acc_t<T>* mean,
    acc_t<T>* rstd,
    int64_t rows,
    int64_t cols,
    double eps) {
  using acc = acc_t<T>;
  at::parallel_for(0, rows, grain_rows(cols), [&](int64_t begin, int64_t end) {
    std::vector<acc> buffer;
    for (int64_t r = begin; r < end; ++r) {
      const acc* x = row_as_acc(input + r * cols, cols, buffer);
      acc mu = 0;
      if constexpr (kCenter) {
        // Summing x - x[0] instead of x keeps the mean exact when it is large
        // against the row's spread (the terms stay of the spread's size).
        const acc shift = cols > 0 ? x[0] : acc(0);
        mu = shift + chunked_sum<acc>(cols, [&](int64_t j) { return x[j] - shift; }) / cols;
        mean[r] = mu;
      }
      const acc var = chunked_sum<acc>(cols, [&](int64_t j) {
        const acc d = x[j] - mu;
        return d * d;
      }) / cols;
      const acc rs = acc(1) / std::sqrt(var + static_cast<acc>(eps));
      rstd[r] = rs;
      T* y = output + r * cols;
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) {
        const acc w = weight ? static_cast<acc>(weight[j]) : acc(1);
        const acc b = bias ? static_cast<acc>(bias[j]) : acc(0);
        y[j] = static_cast<T>((x[j] - mu) * rs * w + b);
      }
    }
  });
}

// Number of row blocks for the weight/bias gradient partials: a function of
// the shape alone (never of the thread count), so the summation order is fixed.
inline int64_t grad_blocks(int64_t rows, int64_t cols, int64_t acc_bytes_per_col) {
  if (rows == 0) return 0;
  const int64_t by_work = std::max<int64_t>(1, rows * std::max<int64_t>(cols, 1) / kGrainElements);
  const int64_t by_memory =
      std::max<int64_t>(1, kMaxGradPartialBytes / std::max<int64_t>(1, cols * acc_bytes_per_col));
  return std::min({rows, by_work, by_memory, kMaxGradBlocks});
}

// grad_input, grad_weight and grad_bias may each be null (not asked for);
// weight may be null (no affine), mean is unused when !kCenter.
template <bool kCenter, typename T, typename W>
void row_norm_backward(
    const T* grad_output,
    const T* input,
    const acc_t<T>* mean,
    const acc_t<T>* rstd,
    const W* weight,
    T* grad_input,
    W* grad_weight,
    W* grad_bias,
    int64_t rows,
    int64_t cols) {
  using acc = acc_t<T>;
  const int64_t partial_rows = (grad_weight ? 1 : 0) + (grad_bias ? 1 : 0);
  const bool param_grads = partial_rows > 0;
  // Without parameter gradients, blocks only split the rows for threads.
  const int64_t blocks = param_grads
      ? grad_blocks(rows, cols, partial_rows * static_cast<int64_t>(sizeof(acc)))
      : (rows + grain_rows(cols) - 1) / grain_rows(cols);
  // Layout: for block b, its grad_weight partial row then its grad_bias one.
  std::vector<acc> partials(param_grads ? blocks * partial_rows * cols : 0, acc(0));

  at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    std::vector<acc> x_buffer, dy_buffer;
    for (int64_t block = block_begin; block < block_end; ++block) {
      acc* dweight_partial = grad_weight ? partials.data() + block * partial_rows * cols : nullptr;
      acc* dbias_partial = grad_bias
          ? partials.data() + (block * partial_rows + (grad_weight ? 1 : 0)) * cols
          : nullptr;
      const int64_t row_begin = rows * block / blocks;
      const int64_t row_end = rows * (block + 1) / blocks;
      for (int64_t r = row_begin; r < row_end; ++r) {
        const acc* x = row_as_acc(input + r * cols, cols, x_buffer);
        const acc* dy = row_as_acc(grad_output + r * cols, cols, dy_buffer);
        const acc mu = kCenter ? mean[r] : acc(0);
        const acc rs = rstd[r];
        if (grad_input) {
          auto g = [&](int64_t j) { return weight ? dy[j] * static_cast<acc>(weight[j]) : dy[j]; };
          const acc sum_g = kCenter ? chunked_sum<acc>(cols, g) : acc(0);
          const acc sum_g_xhat =
              chunked_sum<acc>(cols, [&](int64_t j) { return g(j) * (x[j] - mu) * rs; });
          const acc scale = acc(1) / cols;
          T* dx = grad_input + r * cols;
#pragma omp simd
          for (int64_t j = 0; j < cols; ++j) {
            const acc xhat = (x[j] - mu) * rs;
            dx[j] = static_cast<T>(rs * (g(j) - (sum_g + xhat * sum_g_xhat) * scale));
          }
        }
        if (dweight_partial) {
#pragma omp simd
          for (int64_t j = 0; j < cols; ++j) dweight_partial[j] += dy[j] * (x[j] - mu) * rs;
        }
        if (dbias_partial) {
#pragma omp simd
          for (int64_t j = 0; j < cols; ++j) dbias_partial[j] += dy[j];
        }
      }
    }
  });

  if (!param_grads) return;
  // Add the block partials column by column, in block order.
  at::parallel_for(0, cols, grain_rows(blocks), [&](int64_t col_begin, int64_t col_end) {
    for (int64_t j = col_begin; j < col_end; ++j) {
      acc dweight = 0, dbias = 0;
      for (int64_t block = 0; block < blocks; ++block) {
        const acc* partial = partials.data() + block * partial_rows * cols;
        if (grad_weight) dweight += partial[j];
        if (grad_bias) dbias += partial[(grad_weight ? cols : 0) + j];
      }
      if (grad_weight) grad_weight[j] = static_cast<W>(dweight);
      if (grad_bias) grad_bias[j] = static_cast<W>(dbias);
    }
  });
}

} // namespace layernorm_ext::cpu
