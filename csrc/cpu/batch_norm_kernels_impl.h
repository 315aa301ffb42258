// The BatchNorm kernels declared in batch_norm_kernels.h, written once over a
// Vec<acc> SIMD type with the loop helpers of simd_kernel_helpers.h. Each
// kernels_<isa>.cpp includes this file inside its own namespace, after its
// Vec and the helpers, under its target pragma, so that every instruction set
// gets its own copy of the code with its own symbol names. This file includes
// the two layouts' files (batch_norm_plane_layout_impl.h,
// batch_norm_row_layout_impl.h) and nothing else; none has an include guard.
//
// Design:
// - Two layouts (batch_norm_kernels.h). Planes (NCHW: a channel's values
//   contiguous): lanes run along a plane with the channel's coefficients
//   broadcast. Rows (channels-last, 2-D): one lane per channel, narrow rows
//   folded several at a time so that the lanes fill. Memory is read in
//   address order either way; a channel is never gathered with a stride.
// - Same bits for any thread count: a channel's statistics are merged from
//   per-block partials, the blocks cut from the shape alone, each reduced in
//   a fixed order by the one task that owns it, merged in block order (no
//   atomics). An element of an elementwise pass gets the same operations
//   whichever task, Vec or Scalar path writes it.
// - Memory traffic: the training forward reads the input twice (statistics,
//   normalize) and writes it once; the backward reads x and dy twice (sums,
//   then dx; eval reads dy once). In the plane layout with a channel per
//   thread or more, a task runs both sweeps of a group of channels back to
//   back, so the second reads from cache. Outputs of kStreamBytes or more are
//   written with non-temporal stores when their memory is mapped in
//   (output_stores.h).
// - Precision: sums are of x - shift, shift an estimate of the block's mean,
//   so that a large mean costs no precision; a block's variance comes from
//   that one sweep when it is exact enough, else from a second sweep of
//   squared deviations from the mean, which reads the block from L1/L2
//   (MomentsSweep); blocks merge with Chan et al.'s formula, in double.
// - Threads: everything goes through at::parallel_for (torch's pool, so
//   torch.set_num_threads applies), with grains that keep small inputs inline.

namespace {

// Elements a statistics block covers: small enough that its second sweep
// hits L1/L2.
constexpr int64_t kStatBlock = 1 << 13;
// Smallest piece of work (in elements) worth handing to a thread.
constexpr int64_t kParallelGrain = 1 << 15;

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
    for_each_vector<acc>(channels, [&](auto tag, int64_t c) {
      using V = decltype(tag);
      const V mu = V::load(mean + c);
      const V delta = V::load(other_mean + c) - mu;
      fma(delta, V::broadcast(other_share), mu).store(mean + c);
      (V::load(m2 + c) + fma(delta * delta, V::broadcast(cross), V::load(other_m2 + c)))
          .store(m2 + c);
    });
  }
};

// Adds per-channel sums (into none yet, when count is 0: a copy).
struct SumsMerge {
  template <typename acc>
  static void merge(
      acc* first, acc* second, int64_t count, const acc* other_first, const acc* other_second,
      int64_t, int64_t channels) {
    if (count == 0) {
      std::copy(other_first, other_first + channels, first);
      std::copy(other_second, other_second + channels, second);
      return;
    }
    for_each_vector<acc>(channels, [&](auto tag, int64_t c) {
      using V = decltype(tag);
      (V::load(first + c) + V::load(other_first + c)).store(first + c);
      (V::load(second + c) + V::load(other_second + c)).store(second + c);
    });
  }
};

} // namespace

#include "batch_norm_plane_layout_impl.h"
#include "batch_norm_row_layout_impl.h"

namespace {

// Runs an elementwise pass over the whole tensor in parallel, threads owning
// contiguous element ranges. Row layout: row(offset, width) per folded row of
// `width` elements (see row_fold), value j of channel j % channels. Plane
// layout: plane_range(begin, end) per range of elements (see
// write_plane_range).
template <typename Row, typename PlaneRange>
void parallel_elementwise(
    const ChannelLayout& layout, const Row& row, const PlaneRange& plane_range) {
  const int64_t channels = layout.channels;
  if (layout.inner == 1) {
    const int64_t width = row_fold(channels) * channels;
    const int64_t rows = layout.outer / row_fold(channels);
    at::parallel_for(
        0, rows, std::max<int64_t>(1, kParallelGrain / width),
        [&](int64_t row_begin, int64_t row_end) {
          for (int64_t r = row_begin; r < row_end; ++r) row(r * width, width);
          stream_fence();
        });
    for (int64_t offset = rows * width; offset < layout.outer * channels; offset += channels) {
      row(offset, channels);
    }
    stream_fence();
    return;
  }
  at::parallel_for(
      0, layout.outer * channels * layout.inner, kParallelGrain, [&](int64_t begin, int64_t end) {
        plane_range(begin, end);
        stream_fence();
      });
}

// Statistics of the training forward: per-channel mean and m2 (sum of squared
// deviations from the mean). A block's sum is taken of x - shift, shift being
// an estimate of its mean (shift_estimate of the block's first values; in the
// row layout, of rows spread over the block), so that its rounding error
// scales with the channel's spread and not with its mean (a float32 sum of
// 8192 values near 1e4 would lose the mean's last digits). m2 is the
// corrected two-pass sum(d^2) - sum(d)^2 / n, d = x - mean: the second term
// takes out the error the rounding of the mean leaves in the first.
//
// Each block first tries one sweep: the sums of d = x - shift and d^2 give
// m2 = sum(d^2) - sum(d)^2 / n, which cancels by about (mean - shift)^2 / var
// roundings; when that is at most kOnePassSpread (always, for 17 values or
// fewer: no value of n lies further than n - 1 variances from their mean),
// the one sweep stands, else the block takes the second sweep. The choice
// covers what the shape alone delimits, never what a task happens to sweep
// at once: in the plane layout each channel's block on its own, in the row
// layout a block of rows with all its channels. A plane-layout block's second
// sweep reads it from L1/L2, so the saving is in instructions, not in memory;
// a row-layout block is larger, and its (rare) second sweep reads memory.
template <typename T>
struct MomentsSweep {
  using scalar = T;
  using acc = acc_t<T>;
  static constexpr int64_t kStreams = 1;  // tensors the sweep reads: x
  const T* x;
  ChannelLayout layout;

  // The (mean, m2) of each position of the `rows` rows of `width` values
  // from element `offset` (a block of the row layout), in double.
  void rows_block(int64_t offset, int64_t rows, int64_t width, double* mean, double* m2) const {
    const T* block = x + offset;
    // Each position's shift: the mean of kShiftSamples rows spread evenly
    // over the block (a block whose first rows stand apart, sorted or
    // grouped data, still gets a shift near its mean), or of fewer in a
    // block of fewer than 16 * kShiftSamples rows, so that the estimate
    // costs at most a sixteenth of the sweep.
    std::vector<acc> shift(width);
    const int64_t samples = std::min(kShiftSamples, (rows + 15) / 16);
    for_each_vector<acc>(width, [&](auto tag, int64_t j) {
      using V = decltype(tag);
      V total = V::broadcast(0);
      for (int64_t k = 0; k < samples; ++k) {
        total = total + V::load(block + k * rows / samples * width + j);
      }
      (total * V::broadcast(acc(1) / static_cast<acc>(samples))).store(shift.data() + j);
    });
    column_sums<acc>(
        rows, width,
        [&](auto tag, int64_t r, int64_t j) {
          using V = decltype(tag);
          const V d = V::load(block + r * width + j) - V::load(shift.data() + j);
          return Sums2<V>{d, d * d};
        },
        mean, m2);
    // From the shifted sums (in mean and m2) to the mean and m2.
    const double inv_rows = 1 / static_cast<double>(rows);
    bool exact = true;
    for_each_vector<double>(width, [&](auto tag, int64_t j) {
      using V = decltype(tag);
      const V shifted_sum = V::load(mean + j);
      const V offset_from_shift = shifted_sum * V::broadcast(inv_rows);
      const V block_m2 = V::load(m2 + j) - shifted_sum * offset_from_shift;
      offset_from_shift.store(mean + j);
      block_m2.store(m2 + j);
      exact = one_sweep_exact(offset_from_shift, block_m2 * V::broadcast(inv_rows)) && exact;
    });
    for (int64_t j = 0; j < width; ++j) mean[j] += static_cast<double>(shift[j]);
    if (exact) return;
    // The second sweep takes deviations from the mean rounded to acc; the
    // correction term takes out that rounding.
    for (int64_t j = 0; j < width; ++j) shift[j] = static_cast<acc>(mean[j]);
    std::vector<double> sum_deviations(width);
    column_sums<acc>(
        rows, width,
        [&](auto tag, int64_t r, int64_t j) {
          using V = decltype(tag);
          const V d = V::load(block + r * width + j) - V::load(shift.data() + j);
          return Sums2<V>{d * d, d};
        },
        m2, sum_deviations.data());
    for (int64_t j = 0; j < width; ++j) {
      m2[j] -= sum_deviations[j] * sum_deviations[j] * inv_rows;
    }
  }

  // The (mean, m2) of the block [begin, end) of each of channels [c0, c1).
  void plane_blocks(
      int64_t c0, int64_t c1, int64_t begin, int64_t end, std::array<acc, 2>* stats) const {
    // The sums of the runs are added, and the statistics formed, in double
    // (see chunked_sums), then rounded to acc once.
    std::array<acc, kMaxGroupChannels> shift, mean;
    std::array<double, kMaxGroupChannels> shifted_sum, shifted_squares, sum_squares,
        sum_deviations;
    const int64_t o = begin / layout.inner, i = begin % layout.inner;
    const int64_t first_run = std::min(layout.inner - i, end - begin);
    for (int64_t c = c0; c < c1; ++c) {
      const T* run = x + (o * layout.channels + c) * layout.inner + i;
      shift[c - c0] = shift_estimate<acc>(first_run, [&](int64_t k) { return static_cast<acc>(run[k]); });
      shifted_sum[c - c0] = shifted_squares[c - c0] = 0;
      sum_squares[c - c0] = sum_deviations[c - c0] = 0;
    }
    const double inv_count = 1 / static_cast<double>(end - begin);
    for_each_group_run(layout, c0, c1, begin, end, [&](int64_t c, int64_t offset, int64_t length) {
      const acc s = shift[c - c0];
      const Sums2<double> run = chunked_sums<acc>(length, [&](auto tag, int64_t j) {
        using V = decltype(tag);
        const V d = V::load(x + offset + j) - V::broadcast(s);
        return Sums2<V>{d, d * d};
      });
      shifted_sum[c - c0] += run.first;
      shifted_squares[c - c0] += run.second;
    });
    // Each channel keeps its one sweep when that is exact enough for it (see
    // above), whatever the other channels of the group: how many channels a
    // task sweeps together follows the thread count, a channel's bits must
    // not.
    std::array<bool, kMaxGroupChannels> second_sweep;
    bool any_second_sweep = false;
    for (int64_t k = 0; k < c1 - c0; ++k) {
      const double offset_from_shift = shifted_sum[k] * inv_count;
      mean[k] = static_cast<acc>(shift[k] + offset_from_shift);
      const double m2 = shifted_squares[k] - shifted_sum[k] * offset_from_shift;
      stats[k] = {mean[k], static_cast<acc>(m2)};
      second_sweep[k] =
          !one_sweep_exact(Scalar<double>{offset_from_shift}, Scalar<double>{m2 * inv_count});
      any_second_sweep = any_second_sweep || second_sweep[k];
    }
    if (!any_second_sweep) return;
    for_each_group_run(layout, c0, c1, begin, end, [&](int64_t c, int64_t offset, int64_t length) {
      if (!second_sweep[c - c0]) return;
      const acc mu = mean[c - c0];
      const Sums2<double> run = chunked_sums<acc>(length, [&](auto tag, int64_t j) {
        using V = decltype(tag);
        const V d = V::load(x + offset + j) - V::broadcast(mu);
        return Sums2<V>{d * d, d};
      });
      sum_squares[c - c0] += run.first;
      sum_deviations[c - c0] += run.second;
    });
    for (int64_t k = 0; k < c1 - c0; ++k) {
      if (!second_sweep[k]) continue;
      stats[k] = {mean[k], static_cast<acc>(sum_squares[k] -
                                            sum_deviations[k] * sum_deviations[k] * inv_count)};
    }
  }
};

// Statistics of the backward: per-channel sum(dy) and sum(dy * (x - mean));
// wide_mean is the mean widened to a folded row (see widen).
template <typename T>
struct GradSumsSweep {
  using scalar = T;
  using acc = acc_t<T>;
  static constexpr int64_t kStreams = 2;  // dy and x
  const T* grad_output;
  const T* x;
  const acc* wide_mean;
  ChannelLayout layout;

  // The sums of each position of a block of the row layout (see
  // MomentsSweep::rows_block), in double.
  void rows_block(int64_t offset, int64_t rows, int64_t width, double* sum_dy,
                  double* sum_dy_xmu) const {
    const T* dy = grad_output + offset;
    const T* block = x + offset;
    column_sums<acc>(
        rows, width,
        [&](auto tag, int64_t r, int64_t j) {
          using V = decltype(tag);
          const V g = V::load(dy + r * width + j);
          return Sums2<V>{g, g * (V::load(block + r * width + j) - V::load(wide_mean + j))};
        },
        sum_dy, sum_dy_xmu);
  }

  // The sums over the block [begin, end) of each of channels [c0, c1).
  void plane_blocks(
      int64_t c0, int64_t c1, int64_t begin, int64_t end, std::array<acc, 2>* stats) const {
    // The runs' sums are added in double (see chunked_sums), then rounded once.
    std::array<Sums2<double>, kMaxGroupChannels> sums;
    std::fill(sums.begin(), sums.begin() + (c1 - c0), Sums2<double>{0, 0});
    for_each_group_run(layout, c0, c1, begin, end, [&](int64_t c, int64_t offset, int64_t length) {
      const acc mu = wide_mean[c];
      const Sums2<double> run = chunked_sums<acc>(length, [&](auto tag, int64_t j) {
        using V = decltype(tag);
        const V g = V::load(grad_output + offset + j);
        return Sums2<V>{g, g * (V::load(x + offset + j) - V::broadcast(mu))};
      });
      sums[c - c0].first += run.first;
      sums[c - c0].second += run.second;
    });
    for (int64_t k = 0; k < c1 - c0; ++k) {
      stats[k] = {static_cast<acc>(sums[k].first), static_cast<acc>(sums[k].second)};
    }
  }
};

// The reduction sweep and the elementwise sweep of a training forward or a
// backward. Computes the per-channel statistics pair of `sweep` (a
// MomentsSweep or GradSumsSweep), hands each channel's to
// finish_channel(c, first, second) (which fills the per-channel
// coefficients), then, if `elementwise`, runs the elementwise pass:
// row(offset, width) / plane_range(begin, end) as in
// parallel_elementwise, with widen_coefficients() called first when the row
// bodies are about to run. With at least one channel per thread, a
// plane-layout tensor is done a channel at a time
// (reduce_and_apply_per_channel); the statistics, and so the output bits, are
// the same either way.
template <typename Merge, typename Sweep, typename Finish, typename Widen, typename Row,
          typename PlaneRange>
void reduce_then_apply(
    const Sweep& sweep,
    const Finish& finish_channel,
    const Widen& widen_coefficients,
    bool elementwise,
    const Row& row,
    const PlaneRange& plane_range) {
  using acc = typename Sweep::acc;
  const ChannelLayout& layout = sweep.layout;
  auto plane_blocks = [&](int64_t c0, int64_t c1, int64_t begin, int64_t end,
                          std::array<acc, 2>* stats) { sweep.plane_blocks(c0, c1, begin, end, stats); };
  if (layout.inner > 1 && layout.channels >= at::get_num_threads()) {
    reduce_and_apply_per_channel<Merge, acc>(
        layout, channel_groups<typename Sweep::scalar>(layout, Sweep::kStreams), plane_blocks,
        finish_channel, [&](int64_t c0, int64_t c1) {
          if (elementwise) for_each_plane_of_group(layout, c0, c1, plane_range);
        });
    return;
  }
  auto rows_block = [&](int64_t offset, int64_t rows, int64_t width, double* first,
                        double* second) { sweep.rows_block(offset, rows, width, first, second); };
  const auto stats = layout.inner == 1 ? reduce_rows<Merge, acc>(layout, rows_block)
                                       : reduce_planes<Merge, acc>(layout, plane_blocks);
  for (int64_t c = 0; c < layout.channels; ++c) finish_channel(c, stats.first[c], stats.second[c]);
  if (!elementwise) return;
  if (layout.inner == 1) widen_coefficients();
  parallel_elementwise(layout, row, plane_range);
}

} // namespace

// Forward. Training: normalizes with the batch statistics, writes them to
// save_mean / save_rstd and, when running stats are given, writes their
// momentum update to new_running_*. Eval: normalizes with the running stats,
// written to save_mean and save_rstd.
template <typename T>
void batch_norm_forward(const BatchNormForwardArgs<T>& args) {
  using acc = acc_t<T>;
  const ChannelLayout& layout = args.layout;
  const int64_t channels = layout.channels;
  if (channels == 0) return;
  const int64_t count = layout.outer * layout.inner;
  const bool stream = stream_output(args.output, count * channels);

  // y = (x - center) * scale + shift. A channel whose mean lies further than
  // a standard deviation from 0 takes center = mean, shift = bias:
  // subtracting the mean first keeps it exact, where x * scale would round
  // at the mean's magnitude. Any other takes center = 0 (subtracted
  // exactly) and shift = bias - mean * scale (in double, rounded once):
  // x * scale + shift in one fma, one rounding fewer than the subtraction
  // costs. Per-channel coefficients (center, scale, shift), widened to a
  // folded row for the row layout.
  std::vector<acc> center(channels), scale(channels), shift(channels);
  std::vector<acc> wide_center, wide_scale, wide_shift;
  auto set_coefficients = [&](int64_t c, acc mu, acc rstd) {
    args.save_mean[c] = mu;
    args.save_rstd[c] = rstd;
    scale[c] = args.weight ? rstd * args.weight[c] : rstd;
    const acc bias = args.bias ? args.bias[c] : acc(0);
    const bool mean_within_std = std::abs(mu) * rstd <= acc(1);
    center[c] = mean_within_std ? acc(0) : mu;
    shift[c] = mean_within_std
        ? static_cast<acc>(static_cast<double>(bias) - static_cast<double>(mu) * scale[c])
        : bias;
  };
  auto widen_coefficients = [&] {
    wide_center = widen(center.data(), channels);
    wide_scale = widen(scale.data(), channels);
    wide_shift = widen(shift.data(), channels);
  };
  auto row = [&](int64_t offset, int64_t width) {
    const T* x = args.input + offset;
    const acc* mu = wide_center.data();
    const acc* k = wide_scale.data();
    const acc* b = wide_shift.data();
    write_elements<acc>(args.output + offset, width, stream, [&](auto tag, int64_t j) {
      using V = decltype(tag);
      return fma(V::load(x + j) - V::load(mu + j), V::load(k + j), V::load(b + j));
    });
  };
  auto plane_range = [&](int64_t begin, int64_t end) {
    write_plane_range<acc>(
        args.output, begin, end, layout,
        ChannelCoefficients<acc, 3>{center.data(), scale.data(), shift.data()}, stream,
        [x = args.input](auto tag, int64_t e, const auto& k) {
          using V = decltype(tag);
          return fma(V::load(x + e) - k[0], k[1], k[2]);
        });
  };

  if (!args.training) {
    for (int64_t c = 0; c < channels; ++c) {
      set_coefficients(
          c, args.running_mean[c],
          static_cast<acc>(1 / std::sqrt(static_cast<double>(args.running_var[c]) + args.eps)));
    }
    if (layout.inner == 1) widen_coefficients();
    parallel_elementwise(layout, row, plane_range);
    return;
  }
  const acc m = static_cast<acc>(args.momentum);
  auto finish_channel = [&](int64_t c, acc mu, acc m2) {
    // The corrected two-pass m2 may round to just below 0 for a channel of
    // (nearly) equal values; NaN stays NaN.
    m2 = std::max(m2, acc(0));
    const double var = count > 0 ? static_cast<double>(m2) / static_cast<double>(count) : 0.0;
    // rstd rounded once, from the variance in double.
    set_coefficients(c, mu, static_cast<acc>(1 / std::sqrt(var + args.eps)));
    if (!args.new_running_mean) return;
    // An empty batch leaves the running stats as they are (as torch does).
    const acc old_mean = args.running_mean[c];
    const acc old_var = args.running_var[c];
    const acc unbiased_var = count > 1 ? m2 / static_cast<acc>(count - 1) : old_var;
    args.new_running_mean[c] = count > 0 ? (acc(1) - m) * old_mean + m * mu : old_mean;
    args.new_running_var[c] = count > 0 ? (acc(1) - m) * old_var + m * unbiased_var : old_var;
  };
  reduce_then_apply<MomentsMerge>(
      MomentsSweep<T>{args.input, layout}, finish_channel, widen_coefficients, true, row,
      plane_range);
}

// Backward: see BatchNormBackwardArgs.
template <typename T>
void batch_norm_backward(const BatchNormBackwardArgs<T>& args) {
  using acc = acc_t<T>;
  const ChannelLayout& layout = args.layout;
  const int64_t channels = layout.channels;
  if (channels == 0) return;
  const int64_t count = layout.outer * layout.inner;
  const acc inv_count = count > 0 ? acc(1) / static_cast<acc>(count) : acc(0);
  const bool stream = stream_output(args.grad_input, count * channels);

  // dx = dy * dy_scale + (x - mean) * xmu_scale + shift (training), or
  // dy * dy_scale (eval): per-channel coefficients, widened to a folded row
  // for the row layout.
  std::vector<acc> dy_scale(channels), xmu_scale(channels), shift(channels);
  std::vector<acc> wide_dy_scale, wide_xmu_scale, wide_shift;
  const std::vector<acc> wide_mean = widen(args.mean, channels);
  auto finish_channel = [&](int64_t c, acc sum_dy, acc sum_dy_xmu) {
    const acc rstd = args.rstd[c];
    if (args.grad_weight) args.grad_weight[c] = sum_dy_xmu * rstd;
    if (args.grad_bias) args.grad_bias[c] = sum_dy;
    const acc k = args.weight ? rstd * args.weight[c] : rstd;
    dy_scale[c] = k;
    xmu_scale[c] = -k * rstd * rstd * sum_dy_xmu * inv_count;
    shift[c] = -k * sum_dy * inv_count;
  };
  auto widen_coefficients = [&] {
    wide_dy_scale = widen(dy_scale.data(), channels);
    wide_xmu_scale = widen(xmu_scale.data(), channels);
    wide_shift = widen(shift.data(), channels);
  };
  const bool training = args.training;
  auto row = [&](int64_t offset, int64_t width) {
    const T* dy = args.grad_output + offset;
    const T* x = args.input + offset;
    const acc* mu = wide_mean.data();
    const acc* k_dy = wide_dy_scale.data();
    const acc* k_xmu = wide_xmu_scale.data();
    const acc* b = wide_shift.data();
    if (!training) {
      write_elements<acc>(args.grad_input + offset, width, stream, [&](auto tag, int64_t j) {
        using V = decltype(tag);
        return V::load(dy + j) * V::load(k_dy + j);
      });
      return;
    }
    write_elements<acc>(args.grad_input + offset, width, stream, [&](auto tag, int64_t j) {
      using V = decltype(tag);
      return fma(V::load(dy + j), V::load(k_dy + j),
          fma(V::load(x + j) - V::load(mu + j), V::load(k_xmu + j), V::load(b + j)));
    });
  };
  auto plane_range = [&](int64_t begin, int64_t end) {
    const T* dy = args.grad_output;
    const T* x = args.input;
    if (!training) {
      write_plane_range<acc>(
          args.grad_input, begin, end, layout, ChannelCoefficients<acc, 1>{dy_scale.data()}, stream,
          [dy](auto tag, int64_t e, const auto& k) {
            using V = decltype(tag);
            return V::load(dy + e) * k[0];
          });
      return;
    }
    write_plane_range<acc>(
        args.grad_input, begin, end, layout,
        ChannelCoefficients<acc, 4>{args.mean, dy_scale.data(), xmu_scale.data(), shift.data()},
        stream, [dy, x](auto tag, int64_t e, const auto& k) {
          using V = decltype(tag);
          return fma(V::load(dy + e), k[1], fma(V::load(x + e) - k[0], k[2], k[3]));
        });
  };

  if (args.grad_weight || args.grad_bias || (args.grad_input && training)) {
    reduce_then_apply<SumsMerge>(
        GradSumsSweep<T>{args.grad_output, args.input, wide_mean.data(), layout}, finish_channel,
        widen_coefficients, args.grad_input != nullptr, row, plane_range);
    return;
  }
  if (!args.grad_input) return;
  // Eval, dx only: no sums needed (the eval dx does not use them).
  for (int64_t c = 0; c < channels; ++c) finish_channel(c, acc(0), acc(0));
  if (layout.inner == 1) widen_coefficients();
  parallel_elementwise(layout, row, plane_range);
}

#define LAYERNORM_EXT_INSTANTIATE_BATCH_NORM_KERNELS(T)                   \
  template void batch_norm_forward<T>(const BatchNormForwardArgs<T>&);    \
  template void batch_norm_backward<T>(const BatchNormBackwardArgs<T>&);
LAYERNORM_EXT_INSTANTIATE_BATCH_NORM_KERNELS(float)
LAYERNORM_EXT_INSTANTIATE_BATCH_NORM_KERNELS(double)
LAYERNORM_EXT_INSTANTIATE_BATCH_NORM_KERNELS(c10::Half)
LAYERNORM_EXT_INSTANTIATE_BATCH_NORM_KERNELS(c10::BFloat16)
#undef LAYERNORM_EXT_INSTANTIATE_BATCH_NORM_KERNELS
