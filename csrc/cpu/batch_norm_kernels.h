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
// with one SIMD lane per channel (rows of fewer than 64 channels are taken
// several at a time, see row_fold). Either way memory is read in address
// order, and a channel's data is never gathered with a stride. (A contiguous
// input with C = 1 is one plane, which splits evenly across threads.)
//
// Determinism: a channel's statistics are merged from per-block partials.
// The blocks are cut from the shape alone, each block is reduced in a fixed
// order by the one task that owns it, and the partials are merged in block
// order (after the parallel region, or by the task that owns the channel):
// no atomics, the same bits for any thread count, whichever task split the
// thread count picks. Elementwise passes split the tensor into contiguous
// element ranges, or into channels.
// All work goes through at::parallel_for (torch's OpenMP pool, so
// torch.set_num_threads applies), with grains that keep small inputs inline.
//
// Memory traffic: the training forward sweeps the input twice (statistics,
// then normalize) and writes it once; the backward sweeps x and dy twice
// (per-channel sums, then dx; the eval dx reads dy only). In the plane layout
// with at least one channel per thread, a task owns whole channels and runs
// both sweeps of a channel back to back, so the second one reads it from
// cache and memory sees one read (reduce_and_apply_per_channel). A block's
// mean and then its squared deviations are two sweeps over a block of about
// kStatBlock elements, the second one from L1/L2, so the variance is the exact
// two-pass one (a channel with mean 1e4 and unit variance keeps full
// precision, unlike E[x^2] - E[x]^2) for the memory cost of one pass; blocks
// are merged with Chan et al.'s pairwise formula. Sums are taken of x minus a
// value of the block, so a large mean does not cost the mean its precision
// either.
#pragma once

#include "dispatch.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
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
// Bounds on the per-block partials of the row layout (two per channel each).
constexpr int64_t kMaxRowBlocks = 64;
constexpr int64_t kMaxPartialBytes = int64_t{32} << 20;

// Two statistics per channel, each a vector over the channels; what they are
// depends on the reduction (mean and m2, or sum(dy) and sum(dy * (x - mean))).
template <typename acc>
struct ChannelPair {
  std::vector<acc> first;
  std::vector<acc> second;
};

// Merges the (mean, m2) of `other_count` values per channel into the (mean,
// m2) of `count` values, for `channels` channels at once (m2: the sum of
// squared deviations from the mean); Chan et al.'s pairwise update.
struct MomentsMerge {
  template <typename acc>
  static void merge(
      acc* mean, acc* m2, int64_t count, const acc* other_mean, const acc* other_m2,
      int64_t other_count, int64_t channels) {
    if (other_count == 0) return;
    if (count == 0) {
      std::copy(other_mean, other_mean + channels, mean);
      std::copy(other_m2, other_m2 + channels, m2);
      return;
    }
    const acc other_share = static_cast<acc>(other_count) / static_cast<acc>(count + other_count);
    const acc cross = static_cast<acc>(count) * other_share;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) {
      const acc delta = other_mean[c] - mean[c];
      mean[c] += delta * other_share;
      m2[c] += other_m2[c] + delta * delta * cross;
    }
  }
};

// Adds per-channel sums.
struct SumsMerge {
  template <typename acc>
  static void merge(
      acc* first, acc* second, int64_t, const acc* other_first, const acc* other_second, int64_t,
      int64_t channels) {
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) {
      first[c] += other_first[c];
      second[c] += other_second[c];
    }
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

// Plane layout: a channel's statistics from its blocks of kStatBlock
// positions, block_stats(begin, end) giving one block's pair, merged in block
// order. Every plane-layout reduction ends here, whichever task computed the
// blocks, so the bits depend on the shape alone.
template <typename Merge, typename acc, typename BlockStats>
std::array<acc, 2> merge_channel_blocks(int64_t positions, const BlockStats& block_stats) {
  std::array<acc, 2> total{acc(0), acc(0)};
  for (int64_t begin = 0; begin < positions; begin += kStatBlock) {
    const std::array<acc, 2> block = block_stats(begin, std::min(positions, begin + kStatBlock));
    Merge::merge(
        &total[0], &total[1], begin, &block[0], &block[1],
        std::min(positions - begin, kStatBlock), int64_t{1});
  }
  return total;
}

// Plane layout, many channels: a task owns whole channels, and reduces each
// one's blocks and then runs its elementwise pass while the channel is still
// in cache (L2, or L3 for big channels), where a separate pass would read it
// back from memory. finish_channel(c, first, second) receives the channel's
// statistics, then apply_channel(c) runs its pass.
template <typename Merge, typename acc, typename BlockStats, typename Finish, typename Apply>
void reduce_and_apply_per_channel(
    const ChannelLayout& layout,
    const BlockStats& block_stats,
    const Finish& finish_channel,
    const Apply& apply_channel) {
  const int64_t positions = layout.outer * layout.inner;
  at::parallel_for(
      0, layout.channels, std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(positions, 1)),
      [&](int64_t channel_begin, int64_t channel_end) {
        for (int64_t c = channel_begin; c < channel_end; ++c) {
          const auto stats = merge_channel_blocks<Merge, acc>(
              positions, [&](int64_t begin, int64_t end) { return block_stats(c, begin, end); });
          finish_channel(c, stats[0], stats[1]);
          apply_channel(c);
        }
      });
}

// Plane layout, few channels: tasks own blocks of any channel, so that a
// single channel still spreads over every thread.
template <typename Merge, typename acc, typename BlockStats>
ChannelPair<acc> reduce_planes(const ChannelLayout& layout, const BlockStats& block_stats) {
  const int64_t channels = layout.channels;
  const int64_t positions = layout.outer * layout.inner;
  const int64_t blocks = (positions + kStatBlock - 1) / kStatBlock;
  std::vector<std::array<acc, 2>> partials(channels * blocks);
  at::parallel_for(
      0, channels * blocks, std::max<int64_t>(1, kParallelGrain / kStatBlock),
      [&](int64_t task_begin, int64_t task_end) {
        for (int64_t task = task_begin; task < task_end; ++task) {
          const int64_t begin = (task % blocks) * kStatBlock;
          const int64_t end = std::min(positions, begin + kStatBlock);
          partials[task] = block_stats(task / blocks, begin, end);
        }
      });
  ChannelPair<acc> totals{std::vector<acc>(channels), std::vector<acc>(channels)};
  for (int64_t c = 0; c < channels; ++c) {
    const auto stats = merge_channel_blocks<Merge, acc>(positions, [&](int64_t begin, int64_t) {
      return partials[c * blocks + begin / kStatBlock];
    });
    totals.first[c] = stats[0];
    totals.second[c] = stats[1];
  }
  return totals;
}

// Row layout: rows narrower than kMinRowWidth are swept `fold` rows at a
// time, as one wide row of fold * channels values, value j belonging to
// channel j % channels, so that the SIMD loops have lanes to fill (a
// channels-last image with C = 3 would otherwise run 3-iteration loops).
constexpr int64_t kMinRowWidth = 64;

inline int64_t row_fold(int64_t channels) {
  return channels >= kMinRowWidth ? 1 : (kMinRowWidth + channels - 1) / channels;
}

// A per-channel array repeated to the width of a folded row; its first
// `channels` entries are the per-channel values.
template <typename acc>
std::vector<acc> widen(const acc* per_channel, int64_t channels) {
  std::vector<acc> wide(row_fold(channels) * channels);
  for (size_t j = 0; j < wide.size(); ++j) wide[j] = per_channel[j % channels];
  return wide;
}

// Per-channel reduction in the row layout, on folded rows of `width` values:
// the rows are cut into a shape-determined number of blocks, a task owns
// whole blocks and sweeps a block in sub-blocks of about kStatBlock elements.
// sub_block_stats(offset, rows, width, first, second) writes the pair of
// statistics of `rows` rows of `width` values from element `offset`, per
// value position, which is merged into the block's. The positions of a
// folded row are then merged into their channels, and the rows left over by
// the folding (fewer than `fold`) come last.
template <typename Merge, typename acc, typename SubBlockStats>
ChannelPair<acc> reduce_rows(const ChannelLayout& layout, const SubBlockStats& sub_block_stats) {
  const int64_t channels = layout.channels;
  const int64_t fold = row_fold(channels);
  const int64_t width = fold * channels;
  const int64_t rows = layout.outer / fold;
  const int64_t sub_rows = std::max<int64_t>(1, kStatBlock / width);
  const int64_t blocks = std::min<int64_t>(
      {(rows + sub_rows - 1) / sub_rows, kMaxRowBlocks,
       std::max<int64_t>(1, kMaxPartialBytes / (2 * width * static_cast<int64_t>(sizeof(acc))))});
  // Block b's statistics: first at [2 * b * width, (2 * b + 1) * width), then second.
  std::vector<acc> partials(2 * blocks * width, acc(0));
  auto block_rows = [&](int64_t block) {
    return std::make_pair(rows * block / blocks, rows * (block + 1) / blocks);
  };
  const int64_t block_elements = blocks > 0 ? rows / blocks * width : 1;
  at::parallel_for(
      0, blocks, std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(block_elements, 1)),
      [&](int64_t block_begin, int64_t block_end) {
        std::vector<acc> scratch(2 * width);
        for (int64_t block = block_begin; block < block_end; ++block) {
          acc* first = partials.data() + 2 * block * width;
          const auto [row_begin, row_end] = block_rows(block);
          for (int64_t row = row_begin; row < row_end; row += sub_rows) {
            const int64_t count = std::min(row_end - row, sub_rows);
            sub_block_stats(row * width, count, width, scratch.data(), scratch.data() + width);
            Merge::merge(
                first, first + width, row - row_begin, scratch.data(), scratch.data() + width,
                count, width);
          }
        }
      });
  std::vector<acc> wide(2 * width, acc(0));
  for (int64_t block = 0; block < blocks; ++block) {
    const acc* first = partials.data() + 2 * block * width;
    const auto [row_begin, row_end] = block_rows(block);
    Merge::merge(
        wide.data(), wide.data() + width, row_begin, first, first + width, row_end - row_begin,
        width);
  }
  ChannelPair<acc> totals{std::vector<acc>(channels, acc(0)), std::vector<acc>(channels, acc(0))};
  for (int64_t k = 0; k < fold; ++k) {
    Merge::merge(
        totals.first.data(), totals.second.data(), k * rows, wide.data() + k * channels,
        wide.data() + width + k * channels, rows, channels);
  }
  const int64_t leftover = layout.outer - rows * fold;
  if (leftover > 0) {
    sub_block_stats(rows * width, leftover, channels, wide.data(), wide.data() + channels);
    Merge::merge(
        totals.first.data(), totals.second.data(), rows * fold, wide.data(),
        wide.data() + channels, leftover, channels);
  }
  return totals;
}

// Runs an elementwise pass over the whole tensor in parallel, threads owning
// contiguous element ranges. Row layout: row(offset, width) per folded row of
// `width` elements (see row_fold), value j of channel j % channels. Plane
// layout: plane_run(offset, length, c) per stretch of one plane.
template <typename Row, typename PlaneRun>
void parallel_elementwise(const ChannelLayout& layout, const Row& row, const PlaneRun& plane_run) {
  const int64_t channels = layout.channels;
  if (layout.inner == 1) {
    const int64_t width = row_fold(channels) * channels;
    const int64_t rows = layout.outer / row_fold(channels);
    at::parallel_for(
        0, rows, std::max<int64_t>(1, kParallelGrain / width),
        [&](int64_t row_begin, int64_t row_end) {
          for (int64_t r = row_begin; r < row_end; ++r) row(r * width, width);
        });
    for (int64_t offset = rows * width; offset < layout.outer * channels; offset += channels) {
      row(offset, channels);
    }
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

// Calls plane_run(offset, inner, c) for every plane of channel c.
template <typename PlaneRun>
void for_each_plane_of_channel(const ChannelLayout& layout, int64_t c, const PlaneRun& plane_run) {
  for (int64_t o = 0; o < layout.outer; ++o) {
    plane_run((o * layout.channels + c) * layout.inner, layout.inner, c);
  }
}

// Statistics of the training forward: per-channel mean and m2 (sum of squared
// deviations from the mean). A block's sum is taken of x - shift, shift being
// a value of the block (its first row), so that its rounding error scales
// with the channel's spread and not with its mean (a float32 sum of 8192
// values near 1e4 would lose the mean's last digits).
template <typename T>
struct MomentsSweep {
  using acc = acc_t<T>;
  const T* x;
  ChannelLayout layout;

  void rows_sub_block(int64_t offset, int64_t rows, int64_t width, acc* mean, acc* m2) const {
    const T* shift = x + offset;
    std::fill(mean, mean + width, acc(0));
    std::fill(m2, m2 + width, acc(0));
    for (int64_t r = 0; r < rows; ++r) {
      const T* row = x + offset + r * width;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        mean[j] += static_cast<acc>(row[j]) - static_cast<acc>(shift[j]);
      }
    }
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) {
      mean[j] = static_cast<acc>(shift[j]) + mean[j] / static_cast<acc>(rows);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const T* row = x + offset + r * width;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        const acc d = static_cast<acc>(row[j]) - mean[j];
        m2[j] += d * d;
      }
    }
  }

  std::array<acc, 2> plane_block(int64_t c, int64_t begin, int64_t end) const {
    const int64_t first =
        (begin / layout.inner * layout.channels + c) * layout.inner + begin % layout.inner;
    const acc shift = static_cast<acc>(x[first]);
    acc shifted_sum = 0;
    for_each_channel_run(layout, c, begin, end, [&](int64_t offset, int64_t length) {
      const T* run = x + offset;
      acc run_sum = 0;
#pragma omp simd reduction(+ : run_sum)
      for (int64_t j = 0; j < length; ++j) run_sum += static_cast<acc>(run[j]) - shift;
      shifted_sum += run_sum;
    });
    const acc mean = shift + shifted_sum / static_cast<acc>(end - begin);
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
    return {mean, m2};
  }
};

// Statistics of the backward: per-channel sum(dy) and sum(dy * (x - mean));
// wide_mean is the mean widened to a folded row (see widen).
template <typename T>
struct GradSumsSweep {
  using acc = acc_t<T>;
  const T* grad_output;
  const T* x;
  const acc* wide_mean;
  ChannelLayout layout;

  void rows_sub_block(
      int64_t offset, int64_t rows, int64_t width, acc* sum_dy, acc* sum_dy_xmu) const {
    std::fill(sum_dy, sum_dy + width, acc(0));
    std::fill(sum_dy_xmu, sum_dy_xmu + width, acc(0));
    for (int64_t r = 0; r < rows; ++r) {
      const T* dy = grad_output + offset + r * width;
      const T* row = x + offset + r * width;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        const acc g = static_cast<acc>(dy[j]);
        sum_dy[j] += g;
        sum_dy_xmu[j] += g * (static_cast<acc>(row[j]) - wide_mean[j]);
      }
    }
  }

  std::array<acc, 2> plane_block(int64_t c, int64_t begin, int64_t end) const {
    std::array<acc, 2> sums{acc(0), acc(0)};
    const acc mu = wide_mean[c];
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
      sums[0] += run_dy;
      sums[1] += run_dy_xmu;
    });
    return sums;
  }
};

// The reduction sweep and the elementwise sweep of a training forward or a
// backward. Computes the per-channel statistics pair of `sweep` (a
// MomentsSweep or GradSumsSweep), hands each channel's to
// finish_channel(c, first, second) (which fills the per-channel
// coefficients), then, if `elementwise`, runs the elementwise pass:
// row(offset, width) / plane_run(offset, length, c) as in
// parallel_elementwise, with widen_coefficients() called first when the row
// bodies are about to run. With at least one channel per thread, a
// plane-layout tensor is done a channel at a time
// (reduce_and_apply_per_channel); the statistics, and so the output bits, are
// the same either way.
template <typename Merge, typename Sweep, typename Finish, typename Widen, typename Row,
          typename PlaneRun>
void reduce_then_apply(
    const Sweep& sweep,
    const Finish& finish_channel,
    const Widen& widen_coefficients,
    bool elementwise,
    const Row& row,
    const PlaneRun& plane_run) {
  using acc = typename Sweep::acc;
  const ChannelLayout& layout = sweep.layout;
  auto plane_block = [&](int64_t c, int64_t begin, int64_t end) {
    return sweep.plane_block(c, begin, end);
  };
  if (layout.inner > 1 && layout.channels >= at::get_num_threads()) {
    reduce_and_apply_per_channel<Merge, acc>(layout, plane_block, finish_channel, [&](int64_t c) {
      if (elementwise) for_each_plane_of_channel(layout, c, plane_run);
    });
    return;
  }
  auto rows_sub_block = [&](int64_t offset, int64_t rows, int64_t width, acc* first, acc* second) {
    sweep.rows_sub_block(offset, rows, width, first, second);
  };
  const auto stats = layout.inner == 1 ? reduce_rows<Merge, acc>(layout, rows_sub_block)
                                       : reduce_planes<Merge, acc>(layout, plane_block);
  for (int64_t c = 0; c < layout.channels; ++c) finish_channel(c, stats.first[c], stats.second[c]);
  if (!elementwise) return;
  if (layout.inner == 1) widen_coefficients();
  parallel_elementwise(layout, row, plane_run);
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

  // y = (x - mean) * scale + shift; subtracting the mean first keeps a
  // channel with a large mean exact, where x * scale + (shift - mean * scale)
  // would round x * scale at the mean's magnitude. Per-channel coefficients
  // (save_mean, scale, shift), widened to a folded row for the row layout.
  std::vector<acc> scale(channels), shift(channels);
  std::vector<acc> wide_mean, wide_scale, wide_shift;
  auto set_coefficients = [&](int64_t c, acc mu, acc rstd) {
    save_mean[c] = mu;
    save_rstd[c] = rstd;
    scale[c] = rstd * (weight ? static_cast<acc>(weight[c]) : acc(1));
    shift[c] = bias ? static_cast<acc>(bias[c]) : acc(0);
  };
  auto widen_coefficients = [&] {
    wide_mean = widen(save_mean, channels);
    wide_scale = widen(scale.data(), channels);
    wide_shift = widen(shift.data(), channels);
  };
  auto row = [&](int64_t offset, int64_t width) {
    const T* x = input + offset;
    T* y = output + offset;
    const acc* mu = wide_mean.data();
    const acc* k = wide_scale.data();
    const acc* b = wide_shift.data();
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) {
      y[j] = static_cast<T>((static_cast<acc>(x[j]) - mu[j]) * k[j] + b[j]);
    }
  };
  auto plane_run = [&](int64_t offset, int64_t length, int64_t c) {
    const T* x = input + offset;
    T* y = output + offset;
    const acc mu = save_mean[c], k = scale[c], b = shift[c];
#pragma omp simd
    for (int64_t j = 0; j < length; ++j) {
      y[j] = static_cast<T>((static_cast<acc>(x[j]) - mu) * k + b);
    }
  };

  if (!training) {
    for (int64_t c = 0; c < channels; ++c) {
      const acc var = static_cast<acc>(running_var[c]);
      set_coefficients(
          c, static_cast<acc>(running_mean[c]), acc(1) / std::sqrt(var + static_cast<acc>(eps)));
    }
    if (layout.inner == 1) widen_coefficients();
    parallel_elementwise(layout, row, plane_run);
    return;
  }
  const acc m = static_cast<acc>(momentum);
  auto finish_channel = [&](int64_t c, acc mu, acc m2) {
    const acc var = count > 0 ? m2 / static_cast<acc>(count) : acc(0);
    set_coefficients(c, mu, acc(1) / std::sqrt(var + static_cast<acc>(eps)));
    if (!running_mean) return;
    // An empty batch leaves the running stats as they are (as torch does).
    const acc old_mean = static_cast<acc>(running_mean[c]);
    const acc old_var = static_cast<acc>(running_var[c]);
    const acc unbiased_var = count > 1 ? m2 / static_cast<acc>(count - 1) : old_var;
    new_running_mean[c] = static_cast<W>(count > 0 ? (acc(1) - m) * old_mean + m * mu : old_mean);
    new_running_var[c] =
        static_cast<W>(count > 0 ? (acc(1) - m) * old_var + m * unbiased_var : old_var);
  };
  reduce_then_apply<MomentsMerge>(
      MomentsSweep<T>{input, layout}, finish_channel, widen_coefficients, true, row, plane_run);
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
  const acc inv_count = count > 0 ? acc(1) / static_cast<acc>(count) : acc(0);

  // dx = dy * dy_scale + (x - mean) * xmu_scale + shift (training), or
  // dy * dy_scale (eval): per-channel coefficients, widened to a folded row
  // for the row layout.
  std::vector<acc> dy_scale(channels), xmu_scale(channels), shift(channels);
  std::vector<acc> wide_dy_scale, wide_xmu_scale, wide_shift;
  const std::vector<acc> wide_mean = widen(mean, channels);
  auto finish_channel = [&](int64_t c, acc sum_dy, acc sum_dy_xmu) {
    if (grad_weight) grad_weight[c] = static_cast<W>(sum_dy_xmu * rstd[c]);
    if (grad_bias) grad_bias[c] = static_cast<W>(sum_dy);
    const acc k = rstd[c] * (weight ? static_cast<acc>(weight[c]) : acc(1));
    dy_scale[c] = k;
    xmu_scale[c] = -k * rstd[c] * rstd[c] * sum_dy_xmu * inv_count;
    shift[c] = -k * sum_dy * inv_count;
  };
  auto widen_coefficients = [&] {
    wide_dy_scale = widen(dy_scale.data(), channels);
    wide_xmu_scale = widen(xmu_scale.data(), channels);
    wide_shift = widen(shift.data(), channels);
  };
  auto row = [&](int64_t offset, int64_t width) {
    const T* dy = grad_output + offset;
    const T* x = input + offset;
    T* dx = grad_input + offset;
    const acc* mu = wide_mean.data();
    const acc* k_dy = wide_dy_scale.data();
    const acc* k_xmu = wide_xmu_scale.data();
    const acc* b = wide_shift.data();
    if (training) {
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        dx[j] = static_cast<T>(
            static_cast<acc>(dy[j]) * k_dy[j] + (static_cast<acc>(x[j]) - mu[j]) * k_xmu[j] + b[j]);
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) dx[j] = static_cast<T>(static_cast<acc>(dy[j]) * k_dy[j]);
    }
  };
  auto plane_run = [&](int64_t offset, int64_t length, int64_t c) {
    const T* dy = grad_output + offset;
    const T* x = input + offset;
    T* dx = grad_input + offset;
    const acc mu = mean[c], k_dy = dy_scale[c], k_xmu = xmu_scale[c], b = shift[c];
    if (training) {
#pragma omp simd
      for (int64_t j = 0; j < length; ++j) {
        dx[j] = static_cast<T>(
            static_cast<acc>(dy[j]) * k_dy + (static_cast<acc>(x[j]) - mu) * k_xmu + b);
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < length; ++j) dx[j] = static_cast<T>(static_cast<acc>(dy[j]) * k_dy);
    }
  };

  if (grad_weight || grad_bias || (grad_input && training)) {
    reduce_then_apply<SumsMerge>(
        GradSumsSweep<T>{grad_output, input, wide_mean.data(), layout}, finish_channel,
        widen_coefficients, grad_input != nullptr, row, plane_run);
    return;
  }
  if (!grad_input) return;
  // Eval, dx only: no sums needed (the eval dx does not use them).
  for (int64_t c = 0; c < channels; ++c) finish_channel(c, acc(0), acc(0));
  if (layout.inner == 1) widen_coefficients();
  parallel_elementwise(layout, row, plane_run);
}

} // namespace layernorm_ext::cpu
