// The BatchNorm kernels declared in batch_norm_kernels.h, written once over a
// Vec<acc> SIMD type with the loop helpers of simd_kernel_helpers.h. Each
// kernels_<isa>.cpp includes this file inside its own namespace, after its
// Vec and the helpers, under its target pragma, so that every instruction set
// gets its own copy of the code with its own symbol names. No include guard
// and no #include here: everything is included by the .cpp before its pragma.
//
// Vectorization: plane reductions run lanes along a plane, the channel's
// coefficients broadcast, sums in four accumulators per series
// (chunked_sums); plane elementwise passes run aligned Vecs along the
// tensor, across planes (write_plane_range). Row loops run one lane per
// channel: rows of fewer than 64 channels are taken several at a time (see
// row_fold) so that the lanes fill, and the per-channel sums of a strip of
// kStripVectors vectors stay in registers down the rows of a statistics
// block (column_sums).
//
// Determinism: a channel's statistics are merged from per-block partials.
// The blocks are cut from the shape alone, each block is reduced in a fixed
// order by the one task that owns it (taking one sweep or two from its own
// data, see MomentsSweep), and the partials are merged in block order (after
// the parallel region, or by the task that owns the channel): no atomics,
// the same bits for any thread count, whichever task split the thread count
// picks. Elementwise passes split the tensor into contiguous
// element ranges, or into channels; an element's value does not depend on
// which task, or which of Vec and Scalar, computes it.
// All work goes through at::parallel_for (torch's OpenMP pool, so
// torch.set_num_threads applies), with grains that keep small inputs inline.
//
// Memory traffic: the training forward sweeps the input twice (statistics,
// then normalize) and writes it once; the backward sweeps x and dy twice
// (per-channel sums, then dx; the eval dx reads dy only). In the plane layout
// with at least one channel per thread, a task owns whole channels and runs
// both sweeps of a group of adjacent channels back to back, so the second one
// reads it from cache and memory sees one read (reduce_and_apply_per_channel);
// a group's planes of one sample are adjacent, so the first sweep reads long
// stretches of memory in address order even when planes are short. A block's
// variance, over about kStatBlock elements, comes from one sweep when that is
// exact enough, else from a second sweep of squared deviations from the mean,
// which reads the block from L1/L2 (MomentsSweep): a channel with mean 1e4
// and unit variance keeps full precision, unlike E[x^2] - E[x]^2, for the
// memory cost of one pass; blocks are merged with Chan et al.'s pairwise
// formula. Sums are taken of x minus a value of the block, so a large mean
// does not cost the mean its precision either. Outputs of kStreamBytes or
// more are written with non-temporal stores (simd_kernel_helpers.h).

namespace {

// Elements a statistics block covers: small enough that its second sweep
// hits L1/L2.
constexpr int64_t kStatBlock = 1 << 13;
// Smallest piece of work (in elements) worth handing to a thread.
constexpr int64_t kParallelGrain = 1 << 15;
// Bounds on the per-block partials of the row layout (two per channel each).
constexpr int64_t kMaxRowBlocks = 64;
constexpr int64_t kMaxPartialBytes = int64_t{32} << 20;
// Vectors of a row whose sums column_sums keeps in registers at a time: two
// series of four accumulators, and their operands, fit AVX2's 16 registers.
constexpr int64_t kStripVectors = 4;

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

// Writes out[j] = value(tag, j) for j in [0, length) (a folded row of the
// row layout), a Vec at a time. The ragged end of a run of at least a Vec is
// written by a Vec that overlaps its neighbour (an element's value does not
// depend on which Vec computes it, so the overlap stores the same bits
// twice): one store where Scalar would take up to kLanes - 1. Shorter runs go
// through Scalar. With `stream`, the Vec stores from the first
// kStreamAlignment boundary on are non-temporal, so that every streamed Vec
// is aligned.
template <typename acc, typename T, typename Value>
inline void write_elements(T* out, int64_t length, bool stream, const Value& value) {
  using V = Vec<acc>;
  constexpr int64_t L = V::kLanes;
  if (length < L) {
    for (int64_t j = 0; j < length; ++j) value(Scalar<acc>{}, j).store(out + j);
    return;
  }
  int64_t j = 0;
  if (stream) {
    // Elements before the first aligned one (up to 64 bytes' worth, which
    // may be more than a Vec).
    const auto misalignment = reinterpret_cast<std::uintptr_t>(out) % kStreamAlignment;
    const int64_t head =
        misalignment == 0 ? 0 : (kStreamAlignment - misalignment) / static_cast<int64_t>(sizeof(T));
    if (head + L <= length) {
      for (; j < head; j += L) value(V{}, j).store(out + j);
      for (j = head; j + L <= length; j += L) value(V{}, j).stream(out + j);
    }
  }
  for (; j + L <= length; j += L) value(V{}, j).store(out + j);
  if (j < length) value(V{}, length - L).store(out + length - L);
}

// Calls run(c, offset, length) for each stretch of contiguous elements of
// channels [c0, c1) among their positions [begin, end) (position = o * inner
// + i) in the plane layout, in address order: the stretches of one sample's
// planes, one channel after the other, then those of the next sample. Each
// channel's stretches come in position order.
template <typename Run>
inline void for_each_group_run(
    const ChannelLayout& layout, int64_t c0, int64_t c1, int64_t begin, int64_t end,
    const Run& run) {
  int64_t o = begin / layout.inner;
  int64_t i = begin % layout.inner;
  while (begin < end) {
    const int64_t length = std::min(layout.inner - i, end - begin);
    for (int64_t c = c0; c < c1; ++c) run(c, (o * layout.channels + c) * layout.inner + i, length);
    begin += length;
    ++o;
    i = 0;
  }
}

// Per-channel coefficients of a plane-layout elementwise pass: K arrays of
// `channels` values each (the mean, scale, ... of each channel).
template <typename acc, size_t K>
using ChannelCoefficients = std::array<const acc*, K>;

// Writes out[e] = value(tag, e, coefficients) for the elements e in [begin,
// end) of the plane layout, which may span many planes: `coefficients` holds
// decltype(tag)'s K coefficients of the channels of elements e.. (channel
// (e / inner) % channels). The range is swept as one stretch of Vecs aligned
// on the output's address, not plane by plane: a short plane (14 x 14 = 196
// floats, 784 bytes) leaves most planes off a 64-byte boundary, where every
// per-plane 64-byte load and store would straddle two cache lines, and
// non-temporal stores would fill lines partly, one plane at a time. A Vec
// inside one plane broadcasts its channel's coefficients; a Vec that runs
// into the next plane computes both channels' values and keeps each lane's
// own (select_first), once a plane; with planes shorter than a Vec, every Vec
// gathers its lanes' coefficients one by one. The elements before the first
// aligned Vec and after the last full one go through Scalar. Every path
// computes an element with the same operations, so its bits do not depend on
// which one wrote it.
template <typename acc, typename T, size_t K, typename Value>
void write_plane_range(
    T* out, int64_t begin, int64_t end, const ChannelLayout& layout,
    const ChannelCoefficients<acc, K>& coefficients, bool stream, const Value& value) {
  using V = Vec<acc>;
  constexpr int64_t L = V::kLanes;
  const int64_t inner = layout.inner, channels = layout.channels;
  auto scalar_at = [&](int64_t e) {
    const int64_t c = (e / inner) % channels;
    std::array<Scalar<acc>, K> k;
    for (size_t i = 0; i < K; ++i) k[i] = Scalar<acc>{coefficients[i][c]};
    value(Scalar<acc>{}, e, k).store(out + e);
  };
  const auto misalignment = reinterpret_cast<std::uintptr_t>(out + begin) % kStreamAlignment;
  const int64_t head = std::min(
      end - begin,
      misalignment == 0 ? int64_t{0}
                        : static_cast<int64_t>((kStreamAlignment - misalignment) / sizeof(T)));
  int64_t e = begin;
  for (; e < begin + head; ++e) scalar_at(e);
  // The coefficients of the channel of plane p, as Vecs.
  auto broadcast_channel = [&](int64_t p) {
    const int64_t c = p % channels;
    std::array<V, K> k;
    for (size_t i = 0; i < K; ++i) k[i] = V::broadcast(coefficients[i][c]);
    return k;
  };
  // One loop per store kind, the flag out of the loop body.
  auto sweep = [&](auto streamed) {
    auto write = [&](int64_t at, const V& y) {
      if constexpr (decltype(streamed)::value) {
        y.stream(out + at);
      } else {
        y.store(out + at);
      }
    };
    int64_t plane = e / inner;
    while (e + L <= end) {
      const int64_t plane_end = (plane + 1) * inner;
      // The Vecs inside this plane: its coefficients fresh locals, which the
      // compiler keeps in registers across the stores.
      const std::array<V, K> k = broadcast_channel(plane);
      const int64_t inside_end = std::min(end, plane_end);
      for (; e + L <= inside_end; e += L) write(e, value(V{}, e, k));
      if (e + L > end) return;
      if (e == plane_end) {  // the plane ended on a Vec boundary
        ++plane;
        continue;
      }
      // Across planes. Into the next one only: both channels' values, blended.
      if (e + L <= plane_end + inner) {
        ++plane;
        write(e, select_first(plane_end - e, value(V{}, e, k),
                              value(V{}, e, broadcast_channel(plane))));
        e += L;
        continue;
      }
      // Planes shorter than a Vec: each lane takes its own channel's values.
      alignas(64) acc lanes[K][L];
      int64_t c = plane % channels;
      int64_t lane_plane_end = plane_end;
      for (int64_t l = 0; l < L; ++l) {
        for (; e + l >= lane_plane_end; lane_plane_end += inner) c = c + 1 == channels ? 0 : c + 1;
        for (size_t i = 0; i < K; ++i) lanes[i][l] = coefficients[i][c];
      }
      std::array<V, K> lane_k;
      for (size_t i = 0; i < K; ++i) lane_k[i] = V::load(lanes[i]);
      write(e, value(V{}, e, lane_k));
      e += L;
      plane = e / inner;
    }
  };
  if (stream) {
    sweep(std::true_type{});
  } else {
    sweep(std::false_type{});
  }
  for (; e < end; ++e) scalar_at(e);
}

// Most channels a plane-layout task sweeps together (see channel_groups).
constexpr int64_t kMaxGroupChannels = 64;
// A channel group's planes of one sample make a stretch of about this many
// bytes at least: every stretch starts with the hardware prefetchers
// catching up, a wait on memory...
constexpr int64_t kGroupStretchBytes = int64_t{32} << 10;
// ...and the group's data, swept a second time right after the first, stays
// within about this many bytes (an L2), unless one channel is already more.
constexpr int64_t kGroupCacheBytes = int64_t{1} << 20;

// Plane layout: the statistics of channels [c0, c1) from their blocks of
// kStatBlock positions, block_stats(c0, c1, begin, end, stats) giving the
// pair of each channel's block [begin, end), merged in block order into
// totals (one pair per channel of the group). Every plane-layout reduction
// ends here, whichever task computed the blocks and however many channels it
// swept at once, so the bits depend on the shape alone. The totals are
// merged in double and rounded to acc once: a channel of 10^6 values merges
// 123 blocks, and each merge in float32 would round the running pair again.
template <typename Merge, typename acc, typename BlockStats>
void merge_channel_blocks(
    int64_t positions, int64_t c0, int64_t c1, const BlockStats& block_stats,
    std::array<acc, 2>* totals) {
  std::array<std::array<acc, 2>, kMaxGroupChannels> block;
  std::array<std::array<double, 2>, kMaxGroupChannels> merged;
  std::fill(merged.begin(), merged.begin() + (c1 - c0), std::array<double, 2>{0, 0});
  for (int64_t begin = 0; begin < positions; begin += kStatBlock) {
    const int64_t end = std::min(positions, begin + kStatBlock);
    block_stats(c0, c1, begin, end, block.data());
    for (int64_t k = 0; k < c1 - c0; ++k) {
      const std::array<double, 2> other{block[k][0], block[k][1]};
      Merge::merge(&merged[k][0], &merged[k][1], begin, &other[0], &other[1], end - begin,
                   int64_t{1});
    }
  }
  for (int64_t k = 0; k < c1 - c0; ++k) {
    totals[k] = {static_cast<acc>(merged[k][0]), static_cast<acc>(merged[k][1])};
  }
}

// How many groups of adjacent channels plane-layout tasks sweep, each at
// once: groups of enough channels that one sample's planes of a group are a
// long stretch of memory (a short plane alone would start every stretch with
// a wait on memory, the next one being C planes away), and of few enough
// that a group's `streams` tensors stay in cache for the second sweep; as
// many groups as a multiple of the thread count, so that every thread gets
// the same number of channels (give or take one a group).
template <typename T>
int64_t channel_groups(const ChannelLayout& layout, int64_t streams) {
  const int64_t plane_bytes = std::max<int64_t>(1, layout.inner * static_cast<int64_t>(sizeof(T)));
  const int64_t channel_bytes = layout.outer * plane_bytes * streams;
  const int64_t most_channels = std::max<int64_t>(
      1, std::min<int64_t>(
             {(kGroupStretchBytes + plane_bytes - 1) / plane_bytes,
              kGroupCacheBytes / std::max<int64_t>(channel_bytes, 1), kMaxGroupChannels}));
  const int64_t threads = at::get_num_threads();
  const int64_t groups = (layout.channels + most_channels - 1) / most_channels;
  return std::min(layout.channels, (groups + threads - 1) / threads * threads);
}

// Plane layout, many channels: a task owns whole groups of channels (group
// g of `groups` is channels [C * g / groups, C * (g + 1) / groups), see
// channel_groups), and reduces a group's blocks, sweeping them in address
// order, and then runs its elementwise pass while the group is still in
// cache (L2, or L3 for big channels), where a separate pass would read it
// back from memory. finish_channel(c, first, second) receives each channel's
// statistics, then apply_group(c0, c1) runs the pass of channels [c0, c1).
template <typename Merge, typename acc, typename BlockStats, typename Finish, typename Apply>
void reduce_and_apply_per_channel(
    const ChannelLayout& layout,
    int64_t groups,
    const BlockStats& block_stats,
    const Finish& finish_channel,
    const Apply& apply_group) {
  const int64_t positions = layout.outer * layout.inner;
  const int64_t group_elements = std::max<int64_t>(1, layout.channels / groups * positions);
  at::parallel_for(
      0, groups, std::max<int64_t>(1, kParallelGrain / group_elements),
      [&](int64_t group_begin, int64_t group_end) {
        std::array<std::array<acc, 2>, kMaxGroupChannels> stats;
        for (int64_t g = group_begin; g < group_end; ++g) {
          const int64_t c0 = layout.channels * g / groups;
          const int64_t c1 = layout.channels * (g + 1) / groups;
          merge_channel_blocks<Merge, acc>(positions, c0, c1, block_stats, stats.data());
          for (int64_t c = c0; c < c1; ++c) finish_channel(c, stats[c - c0][0], stats[c - c0][1]);
          apply_group(c0, c1);
        }
        stream_fence();
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
          const int64_t c = task / blocks;
          const int64_t begin = (task % blocks) * kStatBlock;
          const int64_t end = std::min(positions, begin + kStatBlock);
          block_stats(c, c + 1, begin, end, &partials[task]);
        }
      });
  ChannelPair<acc> totals{std::vector<acc>(channels), std::vector<acc>(channels)};
  for (int64_t c = 0; c < channels; ++c) {
    std::array<acc, 2> stats;
    merge_channel_blocks<Merge, acc>(
        positions, c, c + 1,
        [&](int64_t, int64_t, int64_t begin, int64_t, std::array<acc, 2>* block) {
          *block = partials[c * blocks + begin / kStatBlock];
        },
        &stats);
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
  const int64_t fold = row_fold(channels);
  std::vector<acc> wide(fold * channels);
  for (int64_t k = 0; k < fold; ++k) {
    std::copy(per_channel, per_channel + channels, wide.begin() + k * channels);
  }
  return wide;
}

// One strip of column_sums: kVectors vectors of positions from j0, their
// sums in registers while the rows go by.
template <typename acc, int64_t kVectors, typename Terms, typename Finish>
inline void strip_sums(int64_t rows, int64_t j0, const Terms& terms, const Finish& finish) {
  using V = Vec<acc>;
  constexpr int64_t L = V::kLanes;
  V first[kVectors], second[kVectors];
  for (int64_t k = 0; k < kVectors; ++k) first[k] = second[k] = V::broadcast(0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = 0; k < kVectors; ++k) {
      const Sums2<V> t = terms(V{}, r, j0 + k * L);
      first[k] = first[k] + t.first;
      second[k] = second[k] + t.second;
    }
  }
  for (int64_t k = 0; k < kVectors; ++k) finish(V{}, j0 + k * L, Sums2<V>{first[k], second[k]});
}

// Sums two series down the columns of `rows` rows of `width` values:
// terms(tag, r, j) gives both series' terms of row r at positions j.. (a
// Sums2 of decltype(tag), Vec<acc> or Scalar<acc>), summed over the rows in
// row order, and finish(tag, j, sums) receives the sums of positions j...
// Strips of kStripVectors vectors keep their sums in registers (a sum in
// memory would be loaded and stored back for every row); the positions past
// the last full vector are summed one at a time.
template <typename acc, typename Terms, typename Finish>
void column_sums(int64_t rows, int64_t width, const Terms& terms, const Finish& finish) {
  constexpr int64_t L = Vec<acc>::kLanes;
  const int64_t vectors = width / L;
  int64_t v = 0;
  for (; v + kStripVectors <= vectors; v += kStripVectors) {
    strip_sums<acc, kStripVectors>(rows, v * L, terms, finish);
  }
  static_assert(kStripVectors <= 4, "the switch below covers the strips left over");
  switch (vectors - v) {
    case 3:
      strip_sums<acc, 3>(rows, v * L, terms, finish);
      break;
    case 2:
      strip_sums<acc, 2>(rows, v * L, terms, finish);
      break;
    case 1:
      strip_sums<acc, 1>(rows, v * L, terms, finish);
      break;
    default:
      break;
  }
  for (int64_t j = vectors * L; j < width; ++j) {
    Sums2<Scalar<acc>> sums{{acc(0)}, {acc(0)}};
    for (int64_t r = 0; r < rows; ++r) {
      const Sums2<Scalar<acc>> t = terms(Scalar<acc>{}, r, j);
      sums.first = sums.first + t.first;
      sums.second = sums.second + t.second;
    }
    finish(Scalar<acc>{}, j, sums);
  }
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
  // As many blocks as threads could use (a block a task, and no block of
  // less than kParallelGrain elements), within the bounds: every block costs
  // a merge of `width` values.
  const int64_t blocks = std::min<int64_t>(
      {(rows + sub_rows - 1) / sub_rows, kMaxRowBlocks,
       std::max<int64_t>(1, rows * width / kParallelGrain),
       std::max<int64_t>(1, kMaxPartialBytes / (2 * width * static_cast<int64_t>(sizeof(acc))))});
  // Block b's statistics: first at [2 * b * width, (2 * b + 1) * width), then
  // second; written by the block's first merge.
  std::unique_ptr<acc[]> partials(new acc[2 * blocks * width]);
  auto block_rows = [&](int64_t block) {
    return std::make_pair(rows * block / blocks, rows * (block + 1) / blocks);
  };
  const int64_t block_elements = blocks > 0 ? rows / blocks * width : 1;
  at::parallel_for(
      0, blocks, std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(block_elements, 1)),
      [&](int64_t block_begin, int64_t block_end) {
        std::vector<acc> scratch(2 * width);
        for (int64_t block = block_begin; block < block_end; ++block) {
          acc* first = partials.get() + 2 * block * width;
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
    const acc* first = partials.get() + 2 * block * width;
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

// Calls plane_range(begin, end) for the planes of channels [c0, c1) of each
// sample (adjacent in memory), in address order.
template <typename PlaneRange>
void for_each_plane_of_group(
    const ChannelLayout& layout, int64_t c0, int64_t c1, const PlaneRange& plane_range) {
  for (int64_t o = 0; o < layout.outer; ++o) {
    const int64_t sample = o * layout.channels;
    plane_range((sample + c0) * layout.inner, (sample + c1) * layout.inner);
  }
}

// Statistics of the training forward: per-channel mean and m2 (sum of squared
// deviations from the mean). A block's sum is taken of x - shift, shift being
// an estimate of its mean (plane layout: shift_estimate of the block's first
// values; row layout: the sub-block's first row), so that its rounding error
// scales with the channel's spread and not with its mean (a float32 sum of
// 8192 values near 1e4 would lose the mean's last digits). m2 is the corrected
// two-pass sum(d^2) - sum(d)^2 / n, d = x - mean: the second term takes out
// the error the rounding of the mean leaves in the first.
//
// Each block first tries one sweep: the sums of d = x - shift and d^2 give
// m2 = sum(d^2) - sum(d)^2 / n, which cancels by about (mean - shift)^2 / var
// roundings; when that is at most kOnePassSpread (always, for 17 values or
// fewer: no value of n lies further than n - 1 variances from their mean),
// the one sweep stands, else the block takes the second sweep. The choice
// covers what the shape alone delimits, never what a task happens to sweep
// at once: in the plane layout each channel's block on its own, in the row
// layout a sub-block of rows with all its channels. The second sweep reads
// the block from L1/L2, so the saving is in instructions, not in memory.
template <typename T>
struct MomentsSweep {
  using scalar = T;
  using acc = acc_t<T>;
  static constexpr int64_t kStreams = 1;  // tensors the sweep reads: x
  const T* x;
  ChannelLayout layout;

  void rows_sub_block(int64_t offset, int64_t rows, int64_t width, acc* mean, acc* m2) const {
    const T* block = x + offset;
    const acc inv_rows = acc(1) / static_cast<acc>(rows);
    bool exact = true;
    column_sums<acc>(
        rows, width,
        [&](auto tag, int64_t r, int64_t j) {
          using V = decltype(tag);
          const V d = V::load(block + r * width + j) - V::load(block + j);
          return Sums2<V>{d, d * d};
        },
        [&](auto tag, int64_t j, const auto& shifted_sums) {
          using V = decltype(tag);
          const V offset_from_shift = shifted_sums.first * V::broadcast(inv_rows);
          const V sub_block_m2 = shifted_sums.second - shifted_sums.first * offset_from_shift;
          (V::load(block + j) + offset_from_shift).store(mean + j);
          sub_block_m2.store(m2 + j);
          const V sub_block_var = sub_block_m2 * V::broadcast(inv_rows);
          exact = exact && one_sweep_exact(offset_from_shift, sub_block_var);
        });
    if (exact) return;
    column_sums<acc>(
        rows, width,
        [&](auto tag, int64_t r, int64_t j) {
          using V = decltype(tag);
          const V d = V::load(block + r * width + j) - V::load(mean + j);
          return Sums2<V>{d * d, d};
        },
        [&](auto tag, int64_t j, const auto& deviations) {
          using V = decltype(tag);
          const V correction = deviations.second * deviations.second * V::broadcast(inv_rows);
          (deviations.first - correction).store(m2 + j);
        });
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

  void rows_sub_block(
      int64_t offset, int64_t rows, int64_t width, acc* sum_dy, acc* sum_dy_xmu) const {
    const T* dy = grad_output + offset;
    const T* block = x + offset;
    column_sums<acc>(
        rows, width,
        [&](auto tag, int64_t r, int64_t j) {
          using V = decltype(tag);
          const V g = V::load(dy + r * width + j);
          return Sums2<V>{g, g * (V::load(block + r * width + j) - V::load(wide_mean + j))};
        },
        [&](auto, int64_t j, const auto& sums) {
          sums.first.store(sum_dy + j);
          sums.second.store(sum_dy_xmu + j);
        });
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
  auto rows_sub_block = [&](int64_t offset, int64_t rows, int64_t width, acc* first, acc* second) {
    sweep.rows_sub_block(offset, rows, width, first, second);
  };
  const auto stats = layout.inner == 1 ? reduce_rows<Merge, acc>(layout, rows_sub_block)
                                       : reduce_planes<Merge, acc>(layout, plane_blocks);
  for (int64_t c = 0; c < layout.channels; ++c) finish_channel(c, stats.first[c], stats.second[c]);
  if (!elementwise) return;
  if (layout.inner == 1) widen_coefficients();
  parallel_elementwise(layout, row, plane_range);
}

// Whether an elementwise pass writes its output of `elements` T values with
// non-temporal stores.
template <typename T>
bool stream_output(int64_t elements) {
  return elements * static_cast<int64_t>(sizeof(T)) >= kStreamBytes;
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
  const bool stream = stream_output<T>(count * channels);

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
  const bool stream = stream_output<T>(count * channels);

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
