// Vec<A>: 8 lanes of plain C++ for the portable CPU kernels (any CPU, any
// compiler), written so that the compiler's auto-vectorizer can map the lane
// loops onto whatever SIMD the baseline target has (SSE2 on x86-64).
// Conversions are c10's scalar ones. Included by row_norm_portable.cpp and
// batch_norm_portable.cpp inside their namespace.

template <typename A>
struct Vec {
  static constexpr int64_t kLanes = 8;
  A v[kLanes];

  static Vec broadcast(A a) {
    Vec r;
    for (int64_t i = 0; i < kLanes; ++i) r.v[i] = a;
    return r;
  }
  template <typename T>
  static Vec load(const T* p) {
    Vec r;
    for (int64_t i = 0; i < kLanes; ++i) r.v[i] = static_cast<A>(p[i]);
    return r;
  }
  template <typename T>
  void store(T* p) const {
    for (int64_t i = 0; i < kLanes; ++i) p[i] = static_cast<T>(v[i]);
  }
  // No portable non-temporal store: a plain one.
  template <typename T>
  void stream(T* p) const {
    store(p);
  }
  // Pairwise, in a fixed order.
  A sum() const {
    A quad[4], pair[2];
    for (int64_t i = 0; i < 4; ++i) quad[i] = v[i] + v[i + 4];
    for (int64_t i = 0; i < 2; ++i) pair[i] = quad[i] + quad[i + 2];
    return pair[0] + pair[1];
  }
  template <typename Op>
  static Vec lanewise(const Vec& a, const Vec& b, Op op) {
    Vec r;
    for (int64_t i = 0; i < kLanes; ++i) r.v[i] = op(a.v[i], b.v[i]);
    return r;
  }
  friend Vec operator+(Vec a, Vec b) { return lanewise(a, b, [](A x, A y) { return x + y; }); }
  friend Vec operator-(Vec a, Vec b) { return lanewise(a, b, [](A x, A y) { return x - y; }); }
  friend Vec operator*(Vec a, Vec b) { return lanewise(a, b, [](A x, A y) { return x * y; }); }
  // Two roundings: std::fma is a slow library call on CPUs without FMA.
  friend Vec fma(Vec a, Vec b, Vec c) { return a * b + c; }
};

// Scalar a * b + c, with the vector fma's roundings (for the tails).
inline float fma(float a, float b, float c) { return a * b + c; }
inline double fma(double a, double b, double c) { return a * b + c; }
inline void stream_fence() {}
