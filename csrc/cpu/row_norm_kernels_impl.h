// The row kernels declared in row_norm_kernels.h, written once over a Vec<acc>
// SIMD type. Each row_norm_<isa>.cpp includes this file inside its own
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
// sweep loads it (and the residual), writes the fused sum, converts
// half/bfloat16 to acc into a per-task buffer and sums it, all in one pass;
// the variance and normalize sweeps then read the row from L1/L2. Variance is
// two-pass (mean first, then squared deviations), which stays exact for rows
// whose mean is large against their spread, unlike E[x^2] - E[x]^2.
//
// Backward: one sweep loads x and dy (converted into per-task buffers for
// half/bfloat16) and sums dy*w and dy*w*(x - mean); a second writes dx and
// adds the row's terms to its block's weight/bias gradient partial rows. Rows
// are cut into a number of blocks that depends on the shape alone; a task
// owns whole blocks, whose partial rows stay in cache while it sums its rows
// into them in row order; the partials are then added in block order. No
// atomics, and the bits do not depend on the thread count.

template <typename acc>
struct Sums2 {
  acc first;
  acc second;
};

// Sums two series over j in [0, n): vec_terms(j) gives both series' terms for
// elements [j, j + kLanes) as a pair of Vecs, scalar_terms(j) for one element
// of the tail. Called once per element, in order, so the terms may also store
// (conversion buffers). Four accumulators per series hide the add latency.
template <typename acc, typename VecTerms, typename ScalarTerms>
inline Sums2<acc> chunked_sums(int64_t n, const VecTerms& vec_terms, const ScalarTerms& scalar_terms) {
  using V = Vec<acc>;
  constexpr int64_t L = V::kLanes;
  const int64_t n_vec = n - n % L;
  const V zero = V::broadcast(0);
  V total_first = zero, total_second = zero;
  for (int64_t start = 0; start < n_vec; start += kSumChunk) {
    const int64_t end = std::min(n_vec, start + kSumChunk);
    V first[4] = {zero, zero, zero, zero};
    V second[4] = {zero, zero, zero, zero};
    int64_t j = start;
    for (; j + 4 * L <= end; j += 4 * L) {
      for (int k = 0; k < 4; ++k) {
        const auto terms = vec_terms(j + k * L);
        first[k] = first[k] + terms.first;
        second[k] = second[k] + terms.second;
      }
    }
    for (; j < end; j += L) {
      const auto terms = vec_terms(j);
      first[0] = first[0] + terms.first;
      second[0] = second[0] + terms.second;
    }
    total_first = total_first + ((first[0] + first[1]) + (first[2] + first[3]));
    total_second = total_second + ((second[0] + second[1]) + (second[2] + second[3]));
  }
  Sums2<acc> sums{total_first.sum(), total_second.sum()};
  for (int64_t j = n_vec; j < n; ++j) {
    const auto terms = scalar_terms(j);
    sums.first += terms.first;
    sums.second += terms.second;
  }
  return sums;
}

// Calls vec_body(j) for each full Vec of [0, n), then scalar_body(j) for each
// element of the tail.
template <int64_t L, typename VecBody, typename ScalarBody>
inline void for_each_lane_group(int64_t n, const VecBody& vec_body, const ScalarBody& scalar_body) {
  const int64_t n_vec = n - n % L;
  for (int64_t j = 0; j < n_vec; j += L) vec_body(j);
  for (int64_t j = n_vec; j < n; ++j) scalar_body(j);
}

template <bool kCenter, typename T>
void row_norm_forward(const RowNormForwardArgs<T>& args) {
  using acc = acc_t<T>;
  using V = Vec<acc>;
  constexpr int64_t L = V::kLanes;
  constexpr bool kConvert = !std::is_same_v<T, acc>;
  const int64_t cols = args.cols;
  at::parallel_for(0, args.rows, grain_rows(cols), [&](int64_t begin, int64_t end) {
    std::vector<acc> buffer(kConvert ? cols : 0);
    for (int64_t r = begin; r < end; ++r) {
      const T* in = args.input + r * cols;
      const T* res = args.residual ? args.residual + r * cols : nullptr;
      T* sum_out = args.sum ? args.sum + r * cols : nullptr;
      // The row in acc_t: the input itself, the fused sum just written, or
      // the conversion buffer.
      const acc* x;
      if constexpr (kConvert) {
        x = buffer.data();
      } else {
        x = res ? sum_out : in;
      }
      // First sweep: x (rounded to T when it is a fused sum, as the separate
      // add would), stored where needed, and its sum (LayerNorm) or sum of
      // squares (RMSNorm).
      auto load_x = [&](int64_t j) {
        V v = V::load(in + j);
        if (res) {
          (v + V::load(res + j)).store(sum_out + j);
          v = V::load(sum_out + j);
        }
        if constexpr (kConvert) v.store(buffer.data() + j);
        return Sums2<V>{kCenter ? v : v * v, v};
      };
      auto load_x_scalar = [&](int64_t j) {
        acc v = static_cast<acc>(in[j]);
        if (res) {
          sum_out[j] = static_cast<T>(v + static_cast<acc>(res[j]));
          v = static_cast<acc>(sum_out[j]);
        }
        if constexpr (kConvert) buffer[j] = v;
        return Sums2<acc>{kCenter ? v : v * v, v};
      };
      const acc first_sum = chunked_sums<acc>(cols, load_x, load_x_scalar).first;
      acc mu = 0, var;
      if constexpr (kCenter) {
        mu = first_sum / cols;
        args.mean[r] = mu;
        const V mu_v = V::broadcast(mu);
        const Sums2<acc> deviations = chunked_sums<acc>(cols,
            [&](int64_t j) {
              const V d = V::load(x + j) - mu_v;
              return Sums2<V>{d * d, d};
            },
            [&](int64_t j) {
              const acc d = x[j] - mu;
              return Sums2<acc>{d * d, d};
            });
        // The sum of deviations is zero but for the rounding of mu; taking it
        // out (the corrected two-pass formula) removes that error too.
        var = (deviations.first - deviations.second * deviations.second / cols) / cols;
      } else {
        var = first_sum / cols;
      }
      const acc rs = acc(1) / std::sqrt(var + static_cast<acc>(args.eps));
      args.rstd[r] = rs;
      T* y = args.output + r * cols;
      const V mu_v = V::broadcast(mu), rs_v = V::broadcast(rs);
      for_each_lane_group<L>(cols,
          [&](int64_t j) {
            fma((V::load(x + j) - mu_v) * rs_v, V::load(args.weight + j), V::load(args.bias + j))
                .store(y + j);
          },
          [&](int64_t j) {
            y[j] = static_cast<T>((x[j] - mu) * rs * args.weight[j] + args.bias[j]);
          });
    }
  });
}

template <bool kCenter, typename T>
void row_norm_backward(const RowNormBackwardArgs<T>& args) {
  using acc = acc_t<T>;
  using V = Vec<acc>;
  constexpr int64_t L = V::kLanes;
  constexpr bool kConvert = !std::is_same_v<T, acc>;
  const int64_t rows = args.rows, cols = args.cols;
  const int64_t partial_rows = (args.grad_weight ? 1 : 0) + (args.grad_bias ? 1 : 0);
  // Without parameter gradients, blocks only split the rows for threads.
  const int64_t blocks = partial_rows > 0
      ? grad_blocks(rows, cols, partial_rows * static_cast<int64_t>(sizeof(acc)))
      : (rows + grain_rows(cols) - 1) / grain_rows(cols);
  const acc scale = acc(1) / std::max<int64_t>(cols, 1);

  at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    std::vector<acc> x_buffer(kConvert ? cols : 0), dy_buffer(kConvert ? cols : 0);
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
      for (int64_t r = row_begin; r < row_end; ++r) {
        const T* x_in = args.input + r * cols;
        const T* dy_in = args.grad_output + r * cols;
        const acc* x;
        const acc* dy;
        if constexpr (kConvert) {
          x = x_buffer.data();
          dy = dy_buffer.data();
        } else {
          x = x_in;
          dy = dy_in;
        }
        const acc mu = kCenter ? args.mean[r] : acc(0);
        const acc rs = args.rstd[r];
        const V mu_v = V::broadcast(mu);
        // First sweep: sum of g = dy * w and of g * (x - mean).
        const Sums2<acc> sums = chunked_sums<acc>(cols,
            [&](int64_t j) {
              const V xv = V::load(x_in + j), dyv = V::load(dy_in + j);
              if constexpr (kConvert) {
                xv.store(x_buffer.data() + j);
                dyv.store(dy_buffer.data() + j);
              }
              const V g = dyv * V::load(args.weight + j);
              return Sums2<V>{g, g * (xv - mu_v)};
            },
            [&](int64_t j) {
              const acc xv = static_cast<acc>(x_in[j]), dyv = static_cast<acc>(dy_in[j]);
              if constexpr (kConvert) {
                x_buffer[j] = xv;
                dy_buffer[j] = dyv;
              }
              const acc g = dyv * args.weight[j];
              return Sums2<acc>{g, g * (xv - mu)};
            });
        // dx = rs * (g - (sum_g + xhat * sum_g_xhat) / cols)
        //    = g * rs - (xhat * dx_xhat + dx_const)
        const acc sum_g_xhat = sums.second * rs;
        const acc dx_xhat = rs * scale * sum_g_xhat;
        const acc dx_const = kCenter ? rs * scale * sums.first : acc(0);
        const V rs_v = V::broadcast(rs), dx_xhat_v = V::broadcast(dx_xhat),
                dx_const_v = V::broadcast(dx_const);
        T* dx = args.grad_input ? args.grad_input + r * cols : nullptr;
        for_each_lane_group<L>(cols,
            [&](int64_t j) {
              const V dyv = V::load(dy + j);
              const V xhat = (V::load(x + j) - mu_v) * rs_v;
              if (dx) {
                const V g = dyv * V::load(args.weight + j);
                (g * rs_v - fma(xhat, dx_xhat_v, dx_const_v)).store(dx + j);
              }
              if (dweight) fma(dyv, xhat, V::load(dweight + j)).store(dweight + j);
              if (dbias) (V::load(dbias + j) + dyv).store(dbias + j);
            },
            [&](int64_t j) {
              const acc xhat = (x[j] - mu) * rs;
              if (dx) dx[j] = static_cast<T>(dy[j] * args.weight[j] * rs - (xhat * dx_xhat + dx_const));
              if (dweight) dweight[j] += dy[j] * xhat;
              if (dbias) dbias[j] += dy[j];
            });
      }
    }
  });

  if (partial_rows == 0) return;
  // Add the block partials column by column, in block order.
  at::parallel_for(0, cols, grain_rows(blocks), [&](int64_t col_begin, int64_t col_end) {
    auto add_blocks = [&](auto zero, int64_t j, auto load) {
      auto dweight = zero, dbias = zero;
      for (int64_t block = 0; block < blocks; ++block) {
        const acc* partial = args.partials + block * partial_rows * cols + j;
        if (args.grad_weight) dweight = dweight + load(partial);
        if (args.grad_bias) dbias = dbias + load(partial + (args.grad_weight ? cols : 0));
      }
      return Sums2<decltype(zero)>{dweight, dbias};
    };
    for_each_lane_group<L>(col_end - col_begin,
        [&](int64_t offset) {
          const int64_t j = col_begin + offset;
          const auto sums = add_blocks(V::broadcast(0), j, [](const acc* p) { return V::load(p); });
          if (args.grad_weight) sums.first.store(args.grad_weight + j);
          if (args.grad_bias) sums.second.store(args.grad_bias + j);
        },
        [&](int64_t offset) {
          const int64_t j = col_begin + offset;
          const auto sums = add_blocks(acc(0), j, [](const acc* p) { return *p; });
          if (args.grad_weight) args.grad_weight[j] = sums.first;
          if (args.grad_bias) args.grad_bias[j] = sums.second;
        });
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
