// BatchNorm's plane layout (outer x channels x inner, inner > 1: NCHW), for
// batch_norm_kernels_impl.h, which includes this file (no include guard, no
// #include): its elementwise pass over ranges of planes, and its
// per-channel reductions, over blocks of kStatBlock positions of a channel.

namespace {

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

} // namespace
