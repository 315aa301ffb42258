// BatchNorm's row layout (rows of channels: channels-last and 2-D input),
// for batch_norm_kernels_impl.h, which includes this file (no include guard,
// no #include): rows folded to a SIMD-friendly width, their elementwise
// writes, and the per-channel reductions down their columns.

namespace {

// Bounds on the per-block partials of the row layout (two per channel each).
constexpr int64_t kMaxRowBlocks = 64;
constexpr int64_t kMaxPartialBytes = int64_t{32} << 20;
// Vectors of a row whose sums column_sums keeps in registers at a time: two
// series of four accumulators, and their operands, fit AVX2's 16 registers.
constexpr int64_t kStripVectors = 4;

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

// Rows of column_sums summed in registers before their sums are added into
// double totals: a float32 sum runs over at most this many terms, so its
// rounding error stays that of a 32-term sum, however many rows there are.
constexpr int64_t kFlushRows = 32;

// One strip of column_sums: kVectors vectors of positions from j0, their
// sums in registers while up to kFlushRows rows go by, then added into the
// double totals (a loop over lanes that vectorizes to widening adds).
template <typename acc, int64_t kVectors, typename Terms>
inline void strip_sums(int64_t row_begin, int64_t row_end, int64_t j0, const Terms& terms,
                       double* first_total, double* second_total) {
  using V = Vec<acc>;
  constexpr int64_t L = V::kLanes;
  for (int64_t r0 = row_begin; r0 < row_end; r0 += kFlushRows) {
    V first[kVectors], second[kVectors];
    for (int64_t k = 0; k < kVectors; ++k) first[k] = second[k] = V::broadcast(0);
    const int64_t r1 = std::min(row_end, r0 + kFlushRows);
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t k = 0; k < kVectors; ++k) {
        const Sums2<V> t = terms(V{}, r, j0 + k * L);
        first[k] = first[k] + t.first;
        second[k] = second[k] + t.second;
      }
    }
    alignas(64) acc lanes[2][kVectors * L];
    for (int64_t k = 0; k < kVectors; ++k) {
      first[k].store(lanes[0] + k * L);
      second[k].store(lanes[1] + k * L);
    }
    for (int64_t p = 0; p < kVectors * L; ++p) {
      first_total[j0 + p] += static_cast<double>(lanes[0][p]);
      second_total[j0 + p] += static_cast<double>(lanes[1][p]);
    }
  }
}

// Sums two series down the columns of `rows` rows of `width` values into
// first[j] and second[j] (double, zeroed here): terms(tag, r, j) gives both
// series' terms of row r at positions j.. (a Sums2 of decltype(tag),
// Vec<acc> or Scalar<acc>), summed over the rows in row order. The rows go
// by in sub-blocks of about kStatBlock elements (at least kFlushRows rows),
// so that a sweep stays within a window of memory the prefetchers and the
// TLB follow; within a sub-block, strips of kStripVectors vectors keep their
// sums in registers (a sum in memory would be loaded and stored back for
// every row). The positions past the last full vector are summed one at a
// time, in double.
template <typename acc, typename Terms>
void column_sums(int64_t rows, int64_t width, const Terms& terms, double* first, double* second) {
  constexpr int64_t L = Vec<acc>::kLanes;
  std::fill(first, first + width, 0.0);
  std::fill(second, second + width, 0.0);
  const int64_t vectors = width / L;
  const int64_t sub_rows = std::max(kFlushRows, kStatBlock / std::max<int64_t>(width, 1));
  for (int64_t row_begin = 0; row_begin < rows; row_begin += sub_rows) {
    const int64_t row_end = std::min(rows, row_begin + sub_rows);
    int64_t v = 0;
    for (; v + kStripVectors <= vectors; v += kStripVectors) {
      strip_sums<acc, kStripVectors>(row_begin, row_end, v * L, terms, first, second);
    }
    static_assert(kStripVectors <= 4, "the switch below covers the strips left over");
    switch (vectors - v) {
      case 3:
        strip_sums<acc, 3>(row_begin, row_end, v * L, terms, first, second);
        break;
      case 2:
        strip_sums<acc, 2>(row_begin, row_end, v * L, terms, first, second);
        break;
      case 1:
        strip_sums<acc, 1>(row_begin, row_end, v * L, terms, first, second);
        break;
      default:
        break;
    }
  }
  for (int64_t j = vectors * L; j < width; ++j) {
    for (int64_t r = 0; r < rows; ++r) {
      const Sums2<Scalar<acc>> t = terms(Scalar<acc>{}, r, j);
      first[j] += static_cast<double>(t.first.v);
      second[j] += static_cast<double>(t.second.v);
    }
  }
}

// Per-channel reduction in the row layout, on folded rows of `width` values:
// the rows are cut into a shape-determined number of blocks, a task owns
// whole blocks, and block_stats(offset, rows, width, first, second) writes
// the pair of statistics of a block of `rows` rows from element `offset`,
// per value position, in double. The blocks' pairs are merged in block
// order, the positions of a folded row into their channels, and the rows
// left over by the folding (fewer than `fold`) come last. Every merge is in
// double, the totals rounded to acc once.
template <typename Merge, typename acc, typename BlockStats>
ChannelPair<acc> reduce_rows(const ChannelLayout& layout, const BlockStats& block_stats) {
  const int64_t channels = layout.channels;
  const int64_t fold = row_fold(channels);
  const int64_t width = fold * channels;
  const int64_t rows = layout.outer / fold;
  // As many blocks as threads could use (a block a task, and no block of
  // less than kParallelGrain elements), within the bounds: every block costs
  // a merge of `width` values.
  const int64_t blocks = std::min<int64_t>(
      {rows, kMaxRowBlocks, std::max<int64_t>(1, rows * width / kParallelGrain),
       std::max<int64_t>(1, kMaxPartialBytes / (2 * width * static_cast<int64_t>(sizeof(double))))});
  // Block b's statistics: first at [2 * b * width, (2 * b + 1) * width), then
  // second.
  std::unique_ptr<double[]> partials(new double[2 * blocks * width]);
  auto block_rows = [&](int64_t block) {
    return std::make_pair(rows * block / blocks, rows * (block + 1) / blocks);
  };
  const int64_t block_elements = blocks > 0 ? rows / blocks * width : 1;
  at::parallel_for(
      0, blocks, std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(block_elements, 1)),
      [&](int64_t block_begin, int64_t block_end) {
        for (int64_t block = block_begin; block < block_end; ++block) {
          double* first = partials.get() + 2 * block * width;
          const auto [row_begin, row_end] = block_rows(block);
          block_stats(row_begin * width, row_end - row_begin, width, first, first + width);
        }
      });
  std::vector<double> wide(2 * width, 0.0);
  for (int64_t block = 0; block < blocks; ++block) {
    const double* first = partials.get() + 2 * block * width;
    const auto [row_begin, row_end] = block_rows(block);
    Merge::merge(
        wide.data(), wide.data() + width, row_begin, first, first + width, row_end - row_begin,
        width);
  }
  ChannelPair<double> totals{std::vector<double>(channels, 0.0), std::vector<double>(channels, 0.0)};
  for (int64_t k = 0; k < fold; ++k) {
    Merge::merge(
        totals.first.data(), totals.second.data(), k * rows, wide.data() + k * channels,
        wide.data() + width + k * channels, rows, channels);
  }
  const int64_t leftover = layout.outer - rows * fold;
  if (leftover > 0) {
    block_stats(rows * width, leftover, channels, wide.data(), wide.data() + channels);
    Merge::merge(
        totals.first.data(), totals.second.data(), rows * fold, wide.data(),
        wide.data() + channels, leftover, channels);
  }
  return {std::vector<acc>(totals.first.begin(), totals.first.end()),
          std::vector<acc>(totals.second.begin(), totals.second.end())};
}

} // namespace
