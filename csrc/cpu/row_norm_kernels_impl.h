// The row kernels declared in row_norm_kernels.h, written once over a Vec<acc>
// SIMD type. Each kernels_<isa>.cpp includes this file inside its own
// namespace, after its Vec (simd_vec_<isa>.h), under its target pragma, so
// that every instruction set gets its own copy of the code with its own
// symbol names. No include guard and no #include here: everything is included
// by the .cpp before its pragma.
//
// Work split: a task owns whole rows, so a row's statistics are summed in one
// fixed order by one thread (lanes, then a fixed tree of lanes, then chunks
// in order), and the result has the same bits whatever the thread count.
// Rows go to threads through at::parallel_for (torch's OpenMP pool, so
// torch.set_num_threads applies), with a grain of kGrainElements elements so
// that small inputs run inline without waking threads.
//
// Memory: each row is read from memory once and written once. The first
// sweep loads it (and the residual), writes the fused sum and sums it, all
// in one pass; the normalize sweep then reads the row (or the fused sum)
// again from L1/L2, widening half/bfloat16 again on the way, and prefetches
// the next row's input.
//
// LayerNorm's variance: the first sweep sums d = x - shift and d^2, shift
// the mean of the row's first values (shift_estimate), and
// var = (sum d^2 - (sum d)^2 / n) / n. Shifting keeps the terms of the row's
// spread, so a large mean does not cancel as it does in E[x^2] - E[x]^2:
// the cancellation costs a relative error of about (mean - shift)^2 / var
// roundings, a fraction of one for a shift near the mean. When the shift is
// far from the mean ((mean - shift)^2 > kOnePassSpread * var), and for
// non-finite rows, a second sweep takes the squared deviations from the mean
// itself (the corrected two-pass formula). The row kernels are bound by L1
// loads for rows in cache: the second sweep would cost a third of them.
// The sums come back in double (chunked_sums); mean, variance and rstd are
// formed from them in double and rounded to acc once.
//
// Outputs of kStreamBytes or more (too large to stay in cache for their
// consumer) with 64-byte aligned rows, into memory already mapped in, are
// written with non-temporal stores, which skip the read for ownership of
// each destination line: a third less memory traffic (output_stores.h).
//
// Backward: for a group of kRowGroup rows, one sweep per row loads x and dy
// and sums dy*w and dy*w*(x - mean); then one sweep over the columns writes
// the group's dx rows and adds the group's sum of their terms to the block's
// weight/bias gradient partial rows, loading and storing each partial once
// per group instead of once per row: a partial takes one rounded add per
// group, so its error grows with the groups of a block, not its rows. Rows are cut
// into a number of blocks that depends on the shape alone; a task owns whole
// blocks, whose partial rows stay in cache while it sums its rows into them;
// the partials are then added in block order. No atomics, and the bits do not
// depend on the thread count.
//
// The loop helpers (Scalar, for_each_vector, chunked_sums) and the
// non-temporal store policy are in simd_kernel_helpers.h.

constexpr int64_t kRowGroup = 4;

// Whether to write a rows x cols output with non-temporal stores: when it
// is too large to stay in cache and every row starts on a Vec store boundary
// (streamed stores need aligned addresses).
template <typename T>
inline bool stream_output(const T* output, int64_t rows, int64_t cols) {
  const int64_t row_bytes = cols * static_cast<int64_t>(sizeof(T));
  return row_bytes % kStreamAlignment == 0 &&
      reinterpret_cast<std::uintptr_t>(output) % kStreamAlignment == 0 &&
      stream_output(output, rows * cols);
}

template <bool kCenter, typename T>
void row_norm_forward(const RowNormForwardArgs<T>& args) {
  using acc = acc_t<T>;
  const int64_t cols = args.cols;
  const bool stream = stream_output(args.output, args.rows, cols);
  at::parallel_for(0, args.rows, grain_rows(cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* in = args.input + r * cols;
      const T* res = args.residual ? args.residual + r * cols : nullptr;
      T* sum_out = args.sum ? args.sum + r * cols : nullptr;
      // The row as the later sweeps read it (from L1/L2): the input itself or
      // the fused sum just written. Half and bfloat16 are widened again on
      // each load, which costs less than storing and reloading an acc copy.
      const T* x = res ? sum_out : in;
      // LayerNorm sums x - shift, not x: the terms stay of the row's spread,
      // so the mean stays exact when it is large against that spread. The
      // shift is taken from the row as the sweep will see it (the fused sum
      // rounded to T).
      acc shift = 0;
      if constexpr (kCenter) {
        shift = shift_estimate<acc>(cols, [&](int64_t k) {
          const acc value = static_cast<acc>(in[k]);
          return res ? static_cast<acc>(static_cast<T>(value + static_cast<acc>(res[k]))) : value;
        });
      }
      // First sweep: x (rounded to T when it is a fused sum, as the separate
      // add would be), stored where needed, and the sums of d = x - shift and
      // d^2 (LayerNorm) or of x^2 (RMSNorm).
      const Sums2<double> first = chunked_sums<acc>(cols, [&](auto tag, int64_t j) {
        using V = decltype(tag);
        V v = V::load(in + j);
        if (res) {
          (v + V::load(res + j)).store(sum_out + j);
          v = V::load(sum_out + j);
        }
        if constexpr (kCenter) {
          const V d = v - V::broadcast(shift);
          return Sums2<V>{d, d * d};
        } else {
          const V square = v * v;
          return Sums2<V>{square, square};
        }
      });
      acc mu = 0;
      double var;
      if constexpr (kCenter) {
        const double offset = first.first / cols;  // mean - shift
        mu = static_cast<acc>(shift + offset);
        args.mean[r] = mu;
        var = (first.second - first.first * offset) / cols;
        if (!one_sweep_exact(Scalar<double>{offset}, Scalar<double>{var})) {
          const Sums2<double> deviations = chunked_sums<acc>(cols, [&](auto tag, int64_t j) {
            using V = decltype(tag);
            const V d = V::load(x + j) - V::broadcast(mu);
            return Sums2<V>{d * d, d};
          });
          // The sum of deviations is zero but for the rounding of mu; taking
          // it out (the corrected two-pass formula) removes that error too.
          var = (deviations.first - deviations.second * deviations.second / cols) / cols;
        }
      } else {
        var = first.first / cols;
      }
      const acc rs = static_cast<acc>(1 / std::sqrt(var + args.eps));
      args.rstd[r] = rs;
      T* y = args.output + r * cols;
      // Locals, and one loop per store kind: through args and a captured
      // flag, every store to y would make the compiler reload the weight and
      // bias pointers and the flag (a bool may alias anything).
      const auto* weight = args.weight;
      const auto* bias = args.bias;
      // The next row's input is prefetched (to L2) while this one is
      // normalized: that sweep reads from cache only, so without it no
      // memory request would be in flight until the next row's first sweep
      // misses (float32 4096x2048, 1 thread, tcmalloc: 4.4 to 3.4 ms;
      // bfloat16 RMSNorm 8192x4096, 2 threads: 6.6 to 4.2 ms). L2, not L1:
      // two 16 KiB rows in L1 would evict the row being read.
      const T* ahead = r + 1 < end ? in + cols : in;
      auto normalized = [&](auto tag, int64_t j) {
        using V = decltype(tag);
        __builtin_prefetch(ahead + j, 0, 2);
        return fma((V::load(x + j) - V::broadcast(mu)) * V::broadcast(rs), V::load(weight + j),
            V::load(bias + j));
      };
      if (stream) {
        for_each_vector<acc>(cols, [&](auto tag, int64_t j) { normalized(tag, j).stream(y + j); });
      } else {
        for_each_vector<acc>(cols, [&](auto tag, int64_t j) { normalized(tag, j).store(y + j); });
      }
    }
    if (stream) stream_fence();
  });
}

template <bool kCenter, typename T>
void row_norm_backward(const RowNormBackwardArgs<T>& args) {
  using acc = acc_t<T>;
  const int64_t rows = args.rows, cols = args.cols;
  const int64_t partial_rows = (args.grad_weight ? 1 : 0) + (args.grad_bias ? 1 : 0);
  // Without parameter gradients, blocks only split the rows for threads.
  const int64_t blocks = partial_rows > 0
      ? grad_blocks(rows, cols, partial_rows * static_cast<int64_t>(sizeof(acc)))
      : (rows + grain_rows(cols) - 1) / grain_rows(cols);
  // Streamed only when each store fills whole lines: a group writes its rows
  // in turn, and half-line non-temporal stores (half and bfloat16, or float
  // with AVX2) to four lines at once leave the write-combining buffers
  // flushing partial lines, each a read-modify-write in memory (bfloat16
  // 8192x4096: a third slower than ordinary stores).
  const bool stream = Vec<acc>::kLanes * static_cast<int64_t>(sizeof(T)) % kStreamAlignment == 0 &&
      stream_output(args.grad_input, rows, cols);

  // A task takes blocks by the work they hold, so that small inputs stay inline.
  const int64_t blocks_per_task = (blocks + grad_tasks(rows, cols) - 1) / grad_tasks(rows, cols);
  at::parallel_for(0, blocks, blocks_per_task, [&](int64_t block_begin, int64_t block_end) {
    for (int64_t block = block_begin; block < block_end; ++block) {
      // Layout: for block b, its grad_weight partial row then its grad_bias one.
      acc* dweight = args.grad_weight ? args.partials + block * partial_rows * cols : nullptr;
      acc* dbias = args.grad_bias
          ? args.partials + (block * partial_rows + (args.grad_weight ? 1 : 0)) * cols
          : nullptr;
      if (dweight) std::fill(dweight, dweight + cols, acc(0));
      if (dbias) std::fill(dbias, dbias + cols, acc(0));
      const int64_t row_begin = rows * block / blocks;
      const int64_t row_end = rows * (block + 1) / blocks;
      for (int64_t group_begin = row_begin; group_begin < row_end; group_begin += kRowGroup) {
        const int64_t group = std::min(kRowGroup, row_end - group_begin);
        // Per row of the group: the constants of
        // dx = rs * (g - (xhat * mean_g_xhat + mean_g)),   g = dy * w.
        // Kept in this form (not g * rs - ...) so that a one-element row,
        // where xhat = 0 and mean_g = g, gets exactly 0 even when the
        // compiler contracts the products into FMAs.
        const T* x[kRowGroup];
        const T* dy[kRowGroup];
        T* dx[kRowGroup];
        acc mu[kRowGroup], rs[kRowGroup], mean_g_xhat[kRowGroup], mean_g[kRowGroup];
        for (int64_t k = 0; k < group; ++k) {
          const int64_t r = group_begin + k;
          x[k] = args.input + r * cols;
          dy[k] = args.grad_output + r * cols;
          dx[k] = args.grad_input ? args.grad_input + r * cols : nullptr;
          mu[k] = kCenter ? args.mean[r] : acc(0);
          rs[k] = args.rstd[r];
          // Sums of g and of g * (x - mean).
          const Sums2<double> sums = chunked_sums<acc>(cols, [&](auto tag, int64_t j) {
            using V = decltype(tag);
            const V g = V::load(dy[k] + j) * V::load(args.weight + j);
            return Sums2<V>{g, g * (V::load(x[k] + j) - V::broadcast(mu[k]))};
          });
          mean_g_xhat[k] = static_cast<acc>(sums.second * rs[k] / cols);
          mean_g[k] = kCenter ? static_cast<acc>(sums.first / cols) : acc(0);
        }
        // The group's rows are still in L1/L2: read them again (converting
        // half/bfloat16 again is cheaper than buffering them as acc_t). A
        // group of G rows, G a compile-time constant so that the rows'
        // constants stay in registers as Vecs (in memory, every dx store
        // could alias them and would force them to be loaded again).
        auto sweep = [&](auto group_size) {
          constexpr int64_t G = decltype(group_size)::value;
          using VA = Vec<acc>;
          std::array<VA, G> mu_v, rs_v, mean_g_xhat_v, mean_g_v;
          for (int64_t k = 0; k < G; ++k) {
            mu_v[k] = VA::broadcast(mu[k]);
            rs_v[k] = VA::broadcast(rs[k]);
            mean_g_xhat_v[k] = VA::broadcast(mean_g_xhat[k]);
            mean_g_v[k] = VA::broadcast(mean_g[k]);
          }
          // Row k's constant as the tag's type: the Vec, or the scalar.
          auto constant = [](auto tag, const std::array<VA, G>& as_vec, const acc* as_scalar,
                             int64_t k) {
            if constexpr (std::is_same_v<decltype(tag), VA>) {
              return as_vec[k];
            } else {
              return Scalar<acc>{as_scalar[k]};
            }
          };
          const auto* weight = args.weight;
          for_each_vector<acc>(cols, [&](auto tag, int64_t j) {
            using V = decltype(tag);
            const V w = V::load(weight + j);
            V dweight_sum = V::broadcast(0), dbias_sum = V::broadcast(0);
            for (int64_t k = 0; k < G; ++k) {
              const V rs_k = constant(tag, rs_v, rs, k);
              const V dyv = V::load(dy[k] + j);
              const V xhat = (V::load(x[k] + j) - constant(tag, mu_v, mu, k)) * rs_k;
              if (dx[k]) {
                const V dxv = rs_k *
                    (dyv * w - fma(xhat, constant(tag, mean_g_xhat_v, mean_g_xhat, k),
                                   constant(tag, mean_g_v, mean_g, k)));
                if (stream) {
                  dxv.stream(dx[k] + j);
                } else {
                  dxv.store(dx[k] + j);
                }
              }
              dweight_sum = fma(dyv, xhat, dweight_sum);
              dbias_sum = dbias_sum + dyv;
            }
            if (dweight) (V::load(dweight + j) + dweight_sum).store(dweight + j);
            if (dbias) (V::load(dbias + j) + dbias_sum).store(dbias + j);
          });
        };
        static_assert(kRowGroup == 4, "the switch below covers every group size");
        switch (group) {
          case 4:
            sweep(std::integral_constant<int64_t, 4>{});
            break;
          case 3:
            sweep(std::integral_constant<int64_t, 3>{});
            break;
          case 2:
            sweep(std::integral_constant<int64_t, 2>{});
            break;
          default:
            sweep(std::integral_constant<int64_t, 1>{});
            break;
        }
      }
    }
    if (stream) stream_fence();
  });

  if (partial_rows == 0) return;
  // Add the block partials in block order, in double, rounded once. A task
  // takes a chunk of kSumCols columns and runs over the blocks' rows of it
  // (contiguous loads, which the compiler vectorizes), so the order of the
  // adds is the same whatever the thread count.
  constexpr int64_t kSumCols = 256;
  const int64_t col_chunks = (cols + kSumCols - 1) / kSumCols;
  at::parallel_for(0, col_chunks, grain_rows(blocks * kSumCols), [&](int64_t chunk_begin,
                                                                    int64_t chunk_end) {
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      const int64_t col_begin = chunk * kSumCols;
      const int64_t width = std::min(kSumCols, cols - col_begin);
      for (int64_t row = 0; row < partial_rows; ++row) {
        std::array<double, kSumCols> total{};
        for (int64_t block = 0; block < blocks; ++block) {
          const acc* partial = args.partials + (block * partial_rows + row) * cols + col_begin;
          for (int64_t j = 0; j < width; ++j) total[j] += partial[j];
        }
        // Layout as above: the grad_weight partial row first when asked for.
        acc* grad = row == 0 && args.grad_weight ? args.grad_weight : args.grad_bias;
        for (int64_t j = 0; j < width; ++j) grad[col_begin + j] = static_cast<acc>(total[j]);
      }
    }
  });
}

#define LAYERNORM_EXT_INSTANTIATE_ROW_NORM_KERNELS(T)                         \
  template void row_norm_forward<true, T>(const RowNormForwardArgs<T>&);      \
  template void row_norm_forward<false, T>(const RowNormForwardArgs<T>&);     \
  template void row_norm_backward<true, T>(const RowNormBackwardArgs<T>&);    \
  template void row_norm_backward<false, T>(const RowNormBackwardArgs<T>&);
LAYERNORM_EXT_INSTANTIATE_ROW_NORM_KERNELS(float)
LAYERNORM_EXT_INSTANTIATE_ROW_NORM_KERNELS(double)
LAYERNORM_EXT_INSTANTIATE_ROW_NORM_KERNELS(c10::Half)
LAYERNORM_EXT_INSTANTIATE_ROW_NORM_KERNELS(c10::BFloat16)
#undef LAYERNORM_EXT_INSTANTIATE_ROW_NORM_KERNELS
