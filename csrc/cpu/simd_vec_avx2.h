// Vec<float> (8 lanes) and Vec<double> (4 lanes) on AVX2 + FMA + F16C, for
// the CPU kernels. Included by kernels_avx2.cpp
// inside its ISA namespace, under its `#pragma GCC target`. Conversions follow
// the same rules as simd_vec_avx512.h (bit-exact with c10's scalar ones).

template <typename A>
struct Vec;

template <>
struct Vec<float> {
  static constexpr int64_t kLanes = 8;
  __m256 v;

  static Vec broadcast(float a) { return {_mm256_set1_ps(a)}; }
  static Vec load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static Vec load(const c10::BFloat16* p) {
    const __m128i words = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(words), 16))};
  }
  static Vec load(const c10::Half* p) {
    return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
  }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void store(c10::BFloat16* p) const {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), bfloat16_words());
  }
  void store(c10::Half* p) const { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), half_words()); }
  // Non-temporal stores for outputs too large to stay in cache; p must be
  // 64-byte aligned.
  void stream(float* p) const { _mm256_stream_ps(p, v); }
  void stream(c10::BFloat16* p) const { _mm_stream_si128(reinterpret_cast<__m128i*>(p), bfloat16_words()); }
  void stream(c10::Half* p) const { _mm_stream_si128(reinterpret_cast<__m128i*>(p), half_words()); }
  __m128i bfloat16_words() const {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i kept_lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_srli_epi32(
        _mm256_add_epi32(bits, _mm256_add_epi32(kept_lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    const __m256i words = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), nan);
    // packus works within 128-bit halves: gather the two low quadwords.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(words, words), 0x08);
    return _mm256_castsi256_si128(packed);
  }
  __m128i half_words() const { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  float sum() const {
    const __m128 quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
    return _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
  }
};

template <>
struct Vec<double> {
  static constexpr int64_t kLanes = 4;
  __m256d v;

  static Vec broadcast(double a) { return {_mm256_set1_pd(a)}; }
  static Vec load(const double* p) { return {_mm256_loadu_pd(p)}; }
  void store(double* p) const { _mm256_storeu_pd(p, v); }
  void stream(double* p) const { _mm256_stream_pd(p, v); }
  double sum() const {
    const __m128d pair = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(pair, _mm_unpackhi_pd(pair, pair)));
  }
};

// Arithmetic as free functions: GCC does not apply the target pragma to
// friend functions defined inside a class.
inline Vec<float> operator+(Vec<float> a, Vec<float> b) { return {_mm256_add_ps(a.v, b.v)}; }
inline Vec<float> operator-(Vec<float> a, Vec<float> b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline Vec<float> operator*(Vec<float> a, Vec<float> b) { return {_mm256_mul_ps(a.v, b.v)}; }
// a * b + c, rounded once.
inline Vec<float> fma(Vec<float> a, Vec<float> b, Vec<float> c) {
  return {_mm256_fmadd_ps(a.v, b.v, c.v)};
}
inline Vec<double> operator+(Vec<double> a, Vec<double> b) { return {_mm256_add_pd(a.v, b.v)}; }
inline Vec<double> operator-(Vec<double> a, Vec<double> b) { return {_mm256_sub_pd(a.v, b.v)}; }
inline Vec<double> operator*(Vec<double> a, Vec<double> b) { return {_mm256_mul_pd(a.v, b.v)}; }
// a * b + c, rounded once.
inline Vec<double> fma(Vec<double> a, Vec<double> b, Vec<double> c) {
  return {_mm256_fmadd_pd(a.v, b.v, c.v)};
}
// Whether a >= b in every lane (false where either is NaN).
inline bool all_at_least(Vec<float> a, Vec<float> b) {
  return _mm256_movemask_ps(_mm256_cmp_ps(a.v, b.v, _CMP_NGE_UQ)) == 0;
}
inline bool all_at_least(Vec<double> a, Vec<double> b) {
  return _mm256_movemask_pd(_mm256_cmp_pd(a.v, b.v, _CMP_NGE_UQ)) == 0;
}
// Lanes [0, n) of a and the others of b (0 <= n <= kLanes).
inline Vec<float> select_first(int64_t n, Vec<float> a, Vec<float> b) {
  const __m256 first = _mm256_cmp_ps(
      _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_ps(static_cast<float>(n)), _CMP_LT_OQ);
  return {_mm256_blendv_ps(b.v, a.v, first)};
}
inline Vec<double> select_first(int64_t n, Vec<double> a, Vec<double> b) {
  const __m256d first = _mm256_cmp_pd(
      _mm256_setr_pd(0, 1, 2, 3), _mm256_set1_pd(static_cast<double>(n)), _CMP_LT_OQ);
  return {_mm256_blendv_pd(b.v, a.v, first)};
}
// Scalar a * b + c rounded once, as the vector fma (for the tails).
inline float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
inline double fma(double a, double b, double c) { return __builtin_fma(a, b, c); }
// Orders the non-temporal stores before whatever the thread does next.
inline void stream_fence() { _mm_sfence(); }
