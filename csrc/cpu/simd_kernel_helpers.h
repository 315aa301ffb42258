// Loop helpers shared by every SIMD build of the CPU kernels (row norms and
// BatchNorm), written over the build's Vec<acc>. Each kernels_<isa>.cpp
// includes this file inside its ISA namespace, after its Vec
// (simd_vec_<isa>.h) and before the kernels, under its target pragma. No
// include guard and no #include here: everything is included by the .cpp
// before its pragma.
//
// Each loop body is written once, as a generic lambda over the vector type:
// it runs with Vec<acc> over full vectors and with Scalar<acc> (one lane,
// the same operations and roundings) over the ragged ends, so an element's
// result does not depend on which of the two computes it.

// Sums run over chunks of this many elements, each summed in SIMD lanes of
// acc, and the chunk sums are added in order in double: a lane sums at most
// kSumChunk / kLanes terms, so the rounding error of a float32 sum stays
// that of a short sum whatever its length, for two horizontal sums a chunk.
// A multiple of every Vec's 4 * kLanes.
constexpr int64_t kSumChunk = 512;

// Outputs of kStreamBytes or more are too large to stay in cache for their
// consumer: they are written with non-temporal stores, which skip the read
// for ownership of each destination line (a third less memory traffic) and
// need kStreamAlignment-aligned addresses; output_stores.h says when they
// do not pay (memory not yet mapped in).
constexpr int64_t kStreamBytes = int64_t{16} << 20;
constexpr int64_t kStreamAlignment = 64;

// Whether to write an output of `elements` T values with non-temporal
// stores: it is kStreamBytes or more and its memory is mapped in.
template <typename T>
inline bool stream_output(const T* output, int64_t elements) {
  return output != nullptr && elements * static_cast<int64_t>(sizeof(T)) >= kStreamBytes &&
      stream_output_memory(output + elements - 1);
}

// Variances in one sweep: the sums of d = x - shift and d^2, shift an
// estimate of the mean, give n * var = sum(d^2) - sum(d)^2 / n, which
// cancels by about (mean - shift)^2 / var roundings. The shift is the mean of
// the first kShiftSamples values (shift_estimate): (mean - shift)^2 / var is
// then about 1 / kShiftSamples, where a single value of the data (an outlier
// one at that) would cost up to kOnePassSpread roundings. Up to
// kOnePassSpread of them (the one-sweep variance good to about
// 1 + kOnePassSpread roundings) the kernels keep it; beyond (data whose first
// values are far from the rest, or non-finite), they take the squared
// deviations from the mean in a second sweep.
constexpr int64_t kShiftSamples = 8;
constexpr double kOnePassSpread = 16;

// One lane with Vec's interface, for the elements that do not fill a Vec.
template <typename A>
struct Scalar {
  static constexpr int64_t kLanes = 1;
  A v;

  static Scalar broadcast(A a) { return {a}; }
  template <typename T>
  static Scalar load(const T* p) {
    return {static_cast<A>(*p)};
  }
  template <typename T>
  void store(T* p) const {
    *p = static_cast<T>(v);
  }
  template <typename T>
  void stream(T* p) const {
    store(p);
  }
  A sum() const { return v; }
};
template <typename A>
inline Scalar<A> operator+(Scalar<A> a, Scalar<A> b) { return {a.v + b.v}; }
template <typename A>
inline Scalar<A> operator-(Scalar<A> a, Scalar<A> b) { return {a.v - b.v}; }
template <typename A>
inline Scalar<A> operator*(Scalar<A> a, Scalar<A> b) { return {a.v * b.v}; }
template <typename A>
inline Scalar<A> fma(Scalar<A> a, Scalar<A> b, Scalar<A> c) { return {fma(a.v, b.v, c.v)}; }

template <typename A>
inline bool all_at_least(Scalar<A> a, Scalar<A> b) { return a.v >= b.v; }

// Whether a one-sweep variance `var` (m2 / n), of values whose mean lies
// `offset` from the shift, stands (see kOnePassSpread): offset^2 <=
// kOnePassSpread * var in every lane of V (a Vec or a Scalar); false for NaN.
template <typename V>
inline bool one_sweep_exact(V offset, V var) {
  return all_at_least(var * V::broadcast(kOnePassSpread), offset * offset);
}

// The shift of a one-sweep variance (see kShiftSamples): the mean of
// value(k) for k in [0, min(n, kShiftSamples)), 0 when n is 0.
template <typename acc, typename Value>
inline acc shift_estimate(int64_t n, const Value& value) {
  const int64_t samples = std::min(n, kShiftSamples);
  acc total = 0;
  for (int64_t k = 0; k < samples; ++k) total += value(k);
  return samples > 0 ? total / static_cast<acc>(samples) : acc(0);
}

template <typename A>
struct Sums2 {
  A first;
  A second;
};

// Calls body(Vec<acc>{}, j) for each full Vec of [0, n), then
// body(Scalar<acc>{}, j) for each element of the tail.
template <typename acc, typename Body>
inline void for_each_vector(int64_t n, const Body& body) {
  constexpr int64_t L = Vec<acc>::kLanes;
  const int64_t vec_end = n / L * L;
  for (int64_t j = 0; j < vec_end; j += L) body(Vec<acc>{}, j);
  for (int64_t j = vec_end; j < n; ++j) body(Scalar<acc>{}, j);
}

// Sums two series over j in [0, n): terms(tag, j) gives both series' terms
// for the elements at j, as a Sums2 of decltype(tag) (Vec<acc> or
// Scalar<acc>). Called once per element, in order, so terms may also store
// (the row norms' fused residual sum). Four accumulators per series hide the add latency.
// The sums come back in double (see kSumChunk): the caller's formulas take
// them without a float32 rounding first.
template <typename acc, typename Terms>
inline Sums2<double> chunked_sums(int64_t n, const Terms& terms) {
  using V = Vec<acc>;
  constexpr int64_t L = V::kLanes;
  const int64_t n_vec = n - n % L;
  const V zero = V::broadcast(0);
  Sums2<double> sums{0, 0};
  for (int64_t start = 0; start < n_vec; start += kSumChunk) {
    const int64_t end = std::min(n_vec, start + kSumChunk);
    V first[4] = {zero, zero, zero, zero};
    V second[4] = {zero, zero, zero, zero};
    int64_t j = start;
    for (; j + 4 * L <= end; j += 4 * L) {
      for (int k = 0; k < 4; ++k) {
        const Sums2<V> t = terms(V{}, j + k * L);
        first[k] = first[k] + t.first;
        second[k] = second[k] + t.second;
      }
    }
    for (; j < end; j += L) {
      const Sums2<V> t = terms(V{}, j);
      first[0] = first[0] + t.first;
      second[0] = second[0] + t.second;
    }
    sums.first += static_cast<double>(((first[0] + first[1]) + (first[2] + first[3])).sum());
    sums.second += static_cast<double>(((second[0] + second[1]) + (second[2] + second[3])).sum());
  }
  for (int64_t j = n_vec; j < n; ++j) {
    const Sums2<Scalar<acc>> t = terms(Scalar<acc>{}, j);
    sums.first += static_cast<double>(t.first.v);
    sums.second += static_cast<double>(t.second.v);
  }
  return sums;
}
