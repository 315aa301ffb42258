// Vec<A>: 128 bits of A (4 floats or 2 doubles) in plain C++ for the
// portable CPU kernels (any CPU, any compiler): one SSE2 register on x86-64,
// one NEON register on AArch64. Conversions are c10's scalar ones. Included
// by kernels_portable.cpp inside its namespace.
//
// With GCC and Clang the lanes are the compiler's generic vector type, whose
// arithmetic maps onto the target's SIMD instructions and which lives in a
// register; elsewhere they are an array whose lane loops are left to the
// auto-vectorizer. (An array Vec of 8 floats on the stack made GCC refuse to
// inline the kernels' loop bodies, its stack-frame growth limit, and pass
// every Vec through memory.)

#if defined(__GNUC__) || defined(__clang__)
#define LAYERNORM_EXT_VEC_INLINE inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define LAYERNORM_EXT_VEC_INLINE __forceinline
#else
#define LAYERNORM_EXT_VEC_INLINE inline
#endif

// LAYERNORM_EXT_PORTABLE_ARRAY_LANES forces the array lanes (to compile-test them with GCC).
#if (defined(__GNUC__) || defined(__clang__)) && !defined(LAYERNORM_EXT_PORTABLE_ARRAY_LANES)
template <typename A>
struct PortableLanes {
  typedef A type __attribute__((vector_size(16)));
};
#else
template <typename A>
struct PortableLanes {
  struct type {
    static constexpr int64_t kCount = 16 / sizeof(A);
    A lane[kCount];
    A& operator[](int64_t i) { return lane[i]; }
    const A& operator[](int64_t i) const { return lane[i]; }
    template <typename Op>
    static type lanewise(const type& a, const type& b, Op op) {
      type r;
      for (int64_t i = 0; i < kCount; ++i) r.lane[i] = op(a.lane[i], b.lane[i]);
      return r;
    }
    friend type operator+(const type& a, const type& b) {
      return lanewise(a, b, [](A x, A y) { return x + y; });
    }
    friend type operator-(const type& a, const type& b) {
      return lanewise(a, b, [](A x, A y) { return x - y; });
    }
    friend type operator*(const type& a, const type& b) {
      return lanewise(a, b, [](A x, A y) { return x * y; });
    }
  };
};
#endif

template <typename A>
struct Vec {
  static constexpr int64_t kLanes = 16 / sizeof(A);
  typename PortableLanes<A>::type v;

  static LAYERNORM_EXT_VEC_INLINE Vec broadcast(A a) {
    Vec r;
    for (int64_t i = 0; i < kLanes; ++i) r.v[i] = a;
    return r;
  }
  template <typename T>
  static LAYERNORM_EXT_VEC_INLINE Vec load(const T* p) {
    Vec r;
    if constexpr (std::is_same_v<T, A>) {
      std::memcpy(&r.v, p, sizeof(r.v));
    } else {
      for (int64_t i = 0; i < kLanes; ++i) r.v[i] = static_cast<A>(p[i]);
    }
    return r;
  }
  template <typename T>
  LAYERNORM_EXT_VEC_INLINE void store(T* p) const {
    if constexpr (std::is_same_v<T, A>) {
      std::memcpy(p, &v, sizeof(v));
    } else {
      for (int64_t i = 0; i < kLanes; ++i) p[i] = static_cast<T>(v[i]);
    }
  }
  // No portable non-temporal store: a plain one.
  template <typename T>
  LAYERNORM_EXT_VEC_INLINE void stream(T* p) const {
    store(p);
  }
  // Pairwise, in a fixed order.
  LAYERNORM_EXT_VEC_INLINE A sum() const {
    if constexpr (kLanes == 4) {
      return (v[0] + v[2]) + (v[1] + v[3]);
    } else {
      static_assert(kLanes == 2, "a Vec is 128 bits of float or double");
      return v[0] + v[1];
    }
  }
};

template <typename A>
LAYERNORM_EXT_VEC_INLINE Vec<A> operator+(Vec<A> a, Vec<A> b) { return {a.v + b.v}; }
template <typename A>
LAYERNORM_EXT_VEC_INLINE Vec<A> operator-(Vec<A> a, Vec<A> b) { return {a.v - b.v}; }
template <typename A>
LAYERNORM_EXT_VEC_INLINE Vec<A> operator*(Vec<A> a, Vec<A> b) { return {a.v * b.v}; }
// Two roundings: std::fma is a slow library call on CPUs without FMA.
template <typename A>
LAYERNORM_EXT_VEC_INLINE Vec<A> fma(Vec<A> a, Vec<A> b, Vec<A> c) { return a * b + c; }

// Whether a >= b in every lane (false where either is NaN).
template <typename A>
LAYERNORM_EXT_VEC_INLINE bool all_at_least(Vec<A> a, Vec<A> b) {
  bool all = true;
  for (int64_t i = 0; i < Vec<A>::kLanes; ++i) all = all && a.v[i] >= b.v[i];
  return all;
}

// Lanes [0, n) of a and the others of b (0 <= n <= kLanes).
template <typename A>
LAYERNORM_EXT_VEC_INLINE Vec<A> select_first(int64_t n, Vec<A> a, Vec<A> b) {
  Vec<A> r;
  for (int64_t i = 0; i < Vec<A>::kLanes; ++i) r.v[i] = i < n ? a.v[i] : b.v[i];
  return r;
}

// Scalar a * b + c, with the vector fma's roundings (for the tails).
inline float fma(float a, float b, float c) { return a * b + c; }
inline double fma(double a, double b, double c) { return a * b + c; }
inline void stream_fence() {}
