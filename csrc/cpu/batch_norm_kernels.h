// BatchNorm kernels on the CPU: statistics per channel over the batch and
// spatial dims, y = (x - mean_c) * rstd_c * weight_c + bias_c, and the
// gradients.
//
// Layout: an (N, C, *) tensor is seen as outer x channels x inner, element
// (o, c, i) at offset (o * channels + c) * inner + i. A contiguous NCHW input
// is (N, C, H*W): every (n, c) is a plane of `inner` contiguous elements of
// one channel, and the loops run along planes with the channel's
// coefficients in registers. A channels-last input (and a 2-D one) is
// (N*H*W, C, 1): rows of C contiguous channels, and the loops run along rows
// with one SIMD lane per channel. Either way memory is read in address
// order, and a channel's data is never gathered with a stride.
//
// Determinism: a channel's statistics are merged from per-block partials.
// The blocks are cut from the shape alone, each block is reduced in a fixed
// order by the one task that owns it, and the partials are merged in block
// order after the parallel region: no atomics, the same bits for any thread
// count. Elementwise passes split the tensor into contiguous element ranges.
// All work goes through at::parallel_for (torch's OpenMP pool, so
// torch.set_num_threads applies), with grains that keep small inputs inline.
//
// Memory traffic: the training forward reads the input twice (statistics,
// then normalize) and writes it once. A block's mean and then its squared
// deviations are two sweeps over a block of about kStatBlock elements, the
// second one from L1/L2, so the variance is the exact two-pass one (a channel
// with mean 1e4 and unit variance keeps full precision, unlike
// E[x^2] - E[x]^2) for the memory cost of one pass; blocks are merged with
// Chan et al.'s pairwise formula. The backward reads x and dy once for the
// per-channel sums and once more for dx (the eval backward's dx reads dy only).
#pragma once

#include "dispatch.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace layernorm_ext::cpu {

struct ChannelLayout {
  int64_t outer;
  int64_t channels;
  int64_t inner;  // 1: row layout (channels contiguous); > 1: plane layout
};

// Elements a statistics block covers: small enough that its second sweep
// hits L1/L2.
constexpr int64_t kStatBlock = 1 << 13;
// Smallest piece of work (in elements) worth handing to a thread.
constexpr int64_t kParallelGrain = 1 << 15;
// Bounds on the per-block partials of the row layout (one per channel each).
constexpr int64_t kMaxRowBlocks = 64;
constexpr int64_t kMaxPartialBytes = int64_t{32} << 20;

// Count, mean and sum of squared deviations from the mean of a set of values.
template <typename acc>
struct Moments {
  acc mean = 0;
  acc m2 = 0;
  int64_t count = 0;

  // Chan et al.'s update: the moments of the union of both sets.
  void merge(const Moments& other) {
    if (other.count == 0) return;
    if (count == 0) {
      *this = other;
      return;
    }
    const int64_t total = count + other.count;
    const acc delta = other.mean - mean;
    const acc other_share = static_cast<acc>(other.count) / static_cast<acc>(total);
    mean += delta * other_share;
    m2 += other.m2 + delta * delta * static_cast<acc>(count) * other_share;
    count = total;
  }
};

// The per-channel sums the backward needs: sum(dy) and sum(dy * (x - mean)).
template <typename acc>
struct GradSums {
  acc dy = 0;
  acc dy_xmu = 0;

  void merge(const GradSums& other) {
    dy += other.dy;
    dy_xmu += other.dy_xmu;
  }
};

// Calls run(offset, length) for each stretch of contiguous elements of
// channel c among its positions [begin, end) (position = o * inner + i) in
// the plane layout.
template <typename Run>
inline void for_each_channel_run(
    const ChannelLayout& layout, int64_t c, int64_t begin, int64_t end, const Run& run) {
  int64_t o = begin / layout.inner;
  int64_t i = begin % layout.inner;
  while (begin < end) {
    const int64_t length = std::min(layout.inner - i, end - begin);
    run((o * layout.channels + c) * layout.inner + i, length);
    begin += length;
    ++o;
    i = 0;
  }
}

// Per-channel reduction in the plane layout: each channel's outer * inner
// positions are cut into blocks of kStatBlock; a task owns whole blocks and
// block_partial(c, begin, end) reduces one.
template <typename Partial, typename BlockPartial>
std::vector<Partial> reduce_planes(const ChannelLayout& layout, const BlockPartial& block_partial) {
  const int64_t positions = layout.outer * layout.inner;
  const int64_t blocks = (positions + kStatBlock - 1) / kStatBlock;
  std::vector<Partial> partials(layout.channels * blocks);
  at::parallel_for(
      0, layout.channels * blocks, std::max<int64_t>(1, kParallelGrain / kStatBlock),
      [&](int64_t task_begin, int64_t task_end) {
        for (int64_t task = task_begin; task < task_end; ++task) {
          const int64_t c = task / blocks;
          const int64_t begin = (task % blocks) * kStatBlock;
          partials[task] = block_partial(c, begin, std::min(positions, begin + kStatBlock));
        }
      });
  std::vector<Partial> totals(layout.channels);
  for (int64_t c = 0; c < layout.channels; ++c) {
    for (int64_t block = 0; block < blocks; ++block) totals[c].merge(partials[c * blocks + block]);
  }
  return totals;
}

// Per-channel reduction in the row layout: the rows are cut into a
// shape-determined number of blocks, a task owns whole blocks, and a block is
// swept in sub-blocks of about kStatBlock elements:
// sub_block(row_begin, row_end, out) writes one partial per channel, which is
// merged into the block's.
template <typename Partial, typename SubBlock>
std::vector<Partial> reduce_rows(const ChannelLayout& layout, const SubBlock& sub_block) {
  const int64_t rows = layout.outer;
  const int64_t channels = layout.channels;
  const int64_t sub_rows = std::max<int64_t>(1, kStatBlock / channels);
  const int64_t blocks = std::min<int64_t>(
      {(rows + sub_rows - 1) / sub_rows, kMaxRowBlocks,
       std::max<int64_t>(1, kMaxPartialBytes / (channels * static_cast<int64_t>(sizeof(Partial))))});
  std::vector<Partial> partials(blocks * channels);
  const int64_t block_elements = blocks > 0 ? rows / blocks * channels : 1;
  const int64_t grain = std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(block_elements, 1));
  at::parallel_for(0, blocks, grain, [&](int64_t block_begin, int64_t block_end) {
    std::vector<Partial> piece(channels);
    for (int64_t block = block_begin; block < block_end; ++block) {
      Partial* block_partials = partials.data() + block * channels;
      const int64_t row_end = rows * (block + 1) / blocks;
      for (int64_t row = rows * block / blocks; row < row_end; row += sub_rows) {
        sub_block(row, std::min(row_end, row + sub_rows), piece.data());
        for (int64_t c = 0; c < channels; ++c) block_partials[c].merge(piece[c]);
      }
    }
  });
  std::vector<Partial> totals(channels);
  for (int64_t block = 0; block < blocks; ++block) {
    for (int64_t c = 0; c < channels; ++c) totals[c].merge(partials[block * channels + c]);
  }
  return totals;
}

template <typename Partial, typename SubBlock, typename BlockPartial>
std::vector<Partial> reduce_channels(
    const ChannelLayout& layout, const SubBlock& rows_sub_block, const BlockPartial& plane_block) {
  return layout.inner == 1 ? reduce_rows<Partial>(layout, rows_sub_block)
                           : reduce_planes<Partial>(layout, plane_block);
}

// Runs an elementwise pass over the whole tensor in parallel, threads owning
// contiguous element ranges. Row layout: row(offset) per row of `channels`
// elements, channel = index in the row. Plane layout: plane_run(offset,
// length, c) per stretch of one plane.
template <typename Row, typename PlaneRun>
void parallel_elementwise(const ChannelLayout& layout, const Row& row, const PlaneRun& plane_run) {
  const int64_t channels = layout.channels;
  if (layout.inner == 1) {
    at::parallel_for(
        0, layout.outer, std::max<int64_t>(1, kParallelGrain / channels),
        [&](int64_t row_begin, int64_t row_end) {
          for (int64_t r = row_begin; r < row_end; ++r) row(r * channels);
        });
    return;
  }
  const int64_t inner = layout.inner;
  at::parallel_for(
      0, layout.outer * channels * inner, kParallelGrain, [&](int64_t begin, int64_t end) {
        int64_t plane = begin / inner;
        int64_t i = begin % inner;
        while (begin < end) {
          const int64_t length = std::min(inner - i, end - begin);
          plane_run(begin, length, plane % channels);
          begin += length;
          ++plane;
          i = 0;
        }
      });
}

// Per-channel moments of x (the training forward's statistics sweep).
template <typename T>
std::vector<Moments<acc_t<T>>> channel_moments(const T* x, const ChannelLayout& layout) {
  using acc = acc_t<T>;
  const int64_t channels = layout.channels;
  auto rows_sub_block = [&](int64_t row_begin, int64_t row_end, Moments<acc>* out) {
    std::vector<acc> mean_buffer(channels, acc(0)), m2_buffer(channels, acc(0));
    acc* mean = mean_buffer.data();
    acc* m2 = m2_buffer.data();
    for (int64_t r = row_begin; r < row_end; ++r) {
      const T* row = x + r * channels;
#pragma omp simd
      for (int64_t c = 0; c < channels; ++c) mean[c] += static_cast<acc>(row[c]);
    }
    const int64_t count = row_end - row_begin;
    for (int64_t c = 0; c < channels; ++c) mean[c] /= static_cast<acc>(count);
    for (int64_t r = row_begin; r < row_end; ++r) {
      const T* row = x + r * channels;
#pragma omp simd
      for (int64_t c = 0; c < channels; ++c) {
        const acc d = static_cast<acc>(row[c]) - mean[c];
        m2[c] += d * d;
      }
    }
    for (int64_t c = 0; c < channels; ++c) out[c] = Moments<acc>{mean[c], m2[c], count};
  };
  auto plane_block = [&](int64_t c, int64_t begin, int64_t end) {
    acc sum = 0;
    for_each_channel_run(layout, c, begin, end, [&](int64_t offset, int64_t length) {
      const T* run = x + offset;
      acc run_sum = 0;
#pragma omp simd reduction(+ : run_sum)
      for (int64_t j = 0; j < length; ++j) run_sum += static_cast<acc>(run[j]);
      sum += run_sum;
    });
    const acc mean = sum / static_cast<acc>(end - begin);
    acc m2 = 0;
    for_each_channel_run(layout, c, begin, end, [&](int64_t offset, int64_t length) {
      const T* run = x + offset;
      acc run_m2 = 0;
#pragma omp simd reduction(+ : run_m2)
      for (int64_t j = 0; j < length; ++j) {
        const acc d = static_cast<acc>(run[j]) - mean;
        run_m2 += d * d;
      }
      m2 += run_m2;
    });
    return Moments<acc>{mean, m2, end - begin};
  };
  return reduce_channels<Moments<acc>>(layout, rows_sub_block, plane_block);
}

// Per-channel sum(dy) and sum(dy * (x - mean)) (the backward's reduce sweep).
template <typename T>
std::vector<GradSums<acc_t<T>>> channel_grad_sums(
    const T* grad_output, const T* x, const acc_t<T>* mean, const ChannelLayout& layout) {
  using acc = acc_t<T>;
  const int64_t channels = layout.channels;
  auto rows_sub_block = [&](int64_t row_begin, int64_t row_end, GradSums<acc>* out) {
    std::vector<acc> dy_buffer(channels, acc(0)), dy_xmu_buffer(channels, acc(0));
    acc* sum_dy = dy_buffer.data();
    acc* sum_dy_xmu = dy_xmu_buffer.data();
    for (int64_t r = row_begin; r < row_end; ++r) {
      const T* dy = grad_output + r * channels;
      const T* row = x + r * channels;
#pragma omp simd
      for (int64_t c = 0; c < channels; ++c) {
        const acc g = static_cast<acc>(dy[c]);
        sum_dy[c] += g;
        sum_dy_xmu[c] += g * (static_cast<acc>(row[c]) - mean[c]);
      }
    }
    for (int64_t c = 0; c < channels; ++c) out[c] = GradSums<acc>{sum_dy[c], sum_dy_xmu[c]};
  };
  auto plane_block = [&](int64_t c, int64_t begin, int64_t end) {
    GradSums<acc> sums;
    const acc mu = mean[c];
    for_each_channel_run(layout, c, begin, end, [&](int64_t offset, int64_t length) {
      const T* dy = grad_output + offset;
      const T* run = x + offset;
      acc run_dy = 0, run_dy_xmu = 0;
#pragma omp simd reduction(+ : run_dy, run_dy_xmu)
      for (int64_t j = 0; j < length; ++j) {
        const acc g = static_cast<acc>(dy[j]);
        run_dy += g;
        run_dy_xmu += g * (static_cast<acc>(run[j]) - mu);
      }
      sums.merge(GradSums<acc>{run_dy, run_dy_xmu});
    });
    return sums;
  };
  return reduce_channels<GradSums<acc>>(layout, rows_sub_block, plane_block);
}

// Forward. Training: normalizes with the batch statistics, writes them to
// save_mean / save_rstd and, when running stats are given, writes their
// momentum update to new_running_*. Eval: normalizes with the running stats,
// written to save_mean and save_rstd. weight and bias may be null.
template <typename T, typename W>
void batch_norm_forward(
    const T* input,
    const W* weight,
    const W* bias,
    const W* running_mean,
    const W* running_var,
    T* output,
    acc_t<T>* save_mean,
    acc_t<T>* save_rstd,
    W* new_running_mean,
    W* new_running_var,
    const ChannelLayout& layout,
    bool training,
    double momentum,
    double eps) {
  using acc = acc_t<T>;
  const int64_t channels = layout.channels;
  if (channels == 0) return;
  const int64_t count = layout.outer * layout.inner;
  if (training) {
    const auto moments = channel_moments(input, layout);
    const acc m = static_cast<acc>(momentum);
    for (int64_t c = 0; c < channels; ++c) {
      // An empty batch leaves the running stats as they are (as torch does).
      const acc var = count > 0 ? moments[c].m2 / static_cast<acc>(count) : acc(0);
      save_mean[c] = moments[c].mean;
      save_rstd[c] = acc(1) / std::sqrt(var + static_cast<acc>(eps));
      if (!running_mean) continue;
      const acc old_mean = static_cast<acc>(running_mean[c]);
      const acc old_var = static_cast<acc>(running_var[c]);
      const acc unbiased_var = count > 1 ? moments[c].m2 / static_cast<acc>(count - 1) : old_var;
      new_running_mean[c] =
          static_cast<W>(count > 0 ? (acc(1) - m) * old_mean + m * moments[c].mean : old_mean);
      new_running_var[c] =
          static_cast<W>(count > 0 ? (acc(1) - m) * old_var + m * unbiased_var : old_var);
    }
  } else {
    for (int64_t c = 0; c < channels; ++c) {
      save_mean[c] = static_cast<acc>(running_mean[c]);
      save_rstd[c] =
          acc(1) / std::sqrt(static_cast<acc>(running_var[c]) + static_cast<acc>(eps));
    }
  }

  // y = (x - mean) * scale + shift; subtracting the mean first keeps a
  // channel with a large mean exact, where x * scale + (shift - mean * scale)
  // would round x * scale at the mean's magnitude.
  std::vector<acc> scale_buffer(channels), shift_buffer(channels);
  acc* scale = scale_buffer.data();
  acc* shift = shift_buffer.data();
  for (int64_t c = 0; c < channels; ++c) {
    scale[c] = save_rstd[c] * (weight ? static_cast<acc>(weight[c]) : acc(1));
    shift[c] = bias ? static_cast<acc>(bias[c]) : acc(0);
  }
  const acc* mean = save_mean;
  parallel_elementwise(
      layout,
      [&](int64_t offset) {
        const T* x = input + offset;
        T* y = output + offset;
#pragma omp simd
        for (int64_t c = 0; c < channels; ++c) {
          y[c] = static_cast<T>((static_cast<acc>(x[c]) - mean[c]) * scale[c] + shift[c]);
        }
      },
      [&](int64_t offset, int64_t length, int64_t c) {
        const T* x = input + offset;
        T* y = output + offset;
        const acc mu = mean[c], k = scale[c], b = shift[c];
#pragma omp simd
        for (int64_t j = 0; j < length; ++j) {
          y[j] = static_cast<T>((static_cast<acc>(x[j]) - mu) * k + b);
        }
      });
}

// Backward. grad_input, grad_weight and grad_bias may each be null (not asked
// for); weight may be null (no affine). Training: gradients through the batch
// statistics, dx = w * rstd * (dy - mean(dy) - (x - mean) * rstd^2 *
// mean(dy * (x - mean))). Eval: the statistics are constants, dx = w * rstd * dy.
template <typename T, typename W>
void batch_norm_backward(
    const T* grad_output,
    const T* input,
    const W* weight,
    const acc_t<T>* mean,
    const acc_t<T>* rstd,
    T* grad_input,
    W* grad_weight,
    W* grad_bias,
    const ChannelLayout& layout,
    bool training) {
  using acc = acc_t<T>;
  const int64_t channels = layout.channels;
  if (channels == 0) return;
  const int64_t count = layout.outer * layout.inner;
  const bool need_sums = grad_weight || grad_bias || (grad_input && training);
  const auto sums = need_sums ? channel_grad_sums(grad_output, input, mean, layout)
                              : std::vector<GradSums<acc>>(channels);
  for (int64_t c = 0; c < channels; ++c) {
    if (grad_weight) grad_weight[c] = static_cast<W>(sums[c].dy_xmu * rstd[c]);
    if (grad_bias) grad_bias[c] = static_cast<W>(sums[c].dy);
  }
  if (!grad_input) return;

  // dx = dy * dy_scale + (x - mean) * xmu_scale + shift (training), or
  // dy * dy_scale (eval).
  std::vector<acc> dy_scale_buffer(channels), xmu_scale_buffer(channels), shift_buffer(channels);
  acc* dy_scale = dy_scale_buffer.data();
  acc* xmu_scale = xmu_scale_buffer.data();
  acc* shift = shift_buffer.data();
  const acc inv_count = count > 0 ? acc(1) / static_cast<acc>(count) : acc(0);
  for (int64_t c = 0; c < channels; ++c) {
    dy_scale[c] = rstd[c] * (weight ? static_cast<acc>(weight[c]) : acc(1));
    xmu_scale[c] = -dy_scale[c] * rstd[c] * rstd[c] * sums[c].dy_xmu * inv_count;
    shift[c] = -dy_scale[c] * sums[c].dy * inv_count;
  }
  if (training) {
    parallel_elementwise(
        layout,
        [&](int64_t offset) {
          const T* dy = grad_output + offset;
          const T* x = input + offset;
          T* dx = grad_input + offset;
#pragma omp simd
          for (int64_t c = 0; c < channels; ++c) {
            dx[c] = static_cast<T>(
                static_cast<acc>(dy[c]) * dy_scale[c] +
                (static_cast<acc>(x[c]) - mean[c]) * xmu_scale[c] + shift[c]);
          }
        },
        [&](int64_t offset, int64_t length, int64_t c) {
          const T* dy = grad_output + offset;
          const T* x = input + offset;
          T* dx = grad_input + offset;
          const acc mu = mean[c], k_dy = dy_scale[c], k_xmu = xmu_scale[c], b = shift[c];
#pragma omp simd
          for (int64_t j = 0; j < length; ++j) {
            dx[j] = static_cast<T>(
                static_cast<acc>(dy[j]) * k_dy + (static_cast<acc>(x[j]) - mu) * k_xmu + b);
          }
        });
    return;
  }
  parallel_elementwise(
      layout,
      [&](int64_t offset) {
        const T* dy = grad_output + offset;
        T* dx = grad_input + offset;
#pragma omp simd
        for (int64_t c = 0; c < channels; ++c) dx[c] = static_cast<T>(static_cast<acc>(dy[c]) * dy_scale[c]);
      },
      [&](int64_t offset, int64_t length, int64_t c) {
        const T* dy = grad_output + offset;
        T* dx = grad_input + offset;
        const acc k_dy = dy_scale[c];
#pragma omp simd
        for (int64_t j = 0; j < length; ++j) dx[j] = static_cast<T>(static_cast<acc>(dy[j]) * k_dy);
      });
}

} // namespace layernorm_ext::cpu
