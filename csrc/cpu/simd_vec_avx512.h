// Vec<float> (16 lanes) and Vec<double> (8 lanes) on AVX-512, for the CPU
// kernels. Included by kernels_avx512.cpp inside
// its ISA namespace, under its `#pragma GCC target`.
//
// bfloat16 loads widen by a 16-bit shift; stores round to nearest even with
// c10::BFloat16's rule (add 0x7fff plus the kept lowest bit; NaN becomes
// 0x7fc0), so every stored bit matches a scalar static_cast. Half uses the
// hardware conversions (round to nearest even, as c10::Half).

template <typename A>
struct Vec;

template <>
struct Vec<float> {
  static constexpr int64_t kLanes = 16;
  __m512 v;

  static Vec broadcast(float a) { return {_mm512_set1_ps(a)}; }
  static Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static Vec load(const c10::BFloat16* p) {
    const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(words), 16))};
  }
  static Vec load(const c10::Half* p) {
    return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
  }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  void store(c10::BFloat16* p) const {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bfloat16_words());
  }
  void store(c10::Half* p) const { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), half_words()); }
  __m256i bfloat16_words() const {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i kept_lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_srli_epi32(
        _mm512_add_epi32(bits, _mm512_add_epi32(kept_lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    const __m512i words = _mm512_mask_blend_epi32(nan, rounded, _mm512_set1_epi32(0x7fc0));
    return _mm512_cvtepi32_epi16(words);
  }
  __m256i half_words() const { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // Non-temporal stores (no read for ownership, no cache pollution) for
  // outputs too large to stay in cache; p must be 64-byte aligned.
  void stream(float* p) const { _mm512_stream_ps(p, v); }
  void stream(c10::BFloat16* p) const {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), bfloat16_words());
  }
  void stream(c10::Half* p) const { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), half_words()); }
  float sum() const { return _mm512_reduce_add_ps(v); }
};

template <>
struct Vec<double> {
  static constexpr int64_t kLanes = 8;
  __m512d v;

  static Vec broadcast(double a) { return {_mm512_set1_pd(a)}; }
  static Vec load(const double* p) { return {_mm512_loadu_pd(p)}; }
  void store(double* p) const { _mm512_storeu_pd(p, v); }
  void stream(double* p) const { _mm512_stream_pd(p, v); }
  double sum() const { return _mm512_reduce_add_pd(v); }
};

// Arithmetic as free functions: GCC does not apply the target pragma to
// friend functions defined inside a class.
inline Vec<float> operator+(Vec<float> a, Vec<float> b) { return {_mm512_add_ps(a.v, b.v)}; }
inline Vec<float> operator-(Vec<float> a, Vec<float> b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline Vec<float> operator*(Vec<float> a, Vec<float> b) { return {_mm512_mul_ps(a.v, b.v)}; }
// a * b + c, rounded once.
inline Vec<float> fma(Vec<float> a, Vec<float> b, Vec<float> c) {
  return {_mm512_fmadd_ps(a.v, b.v, c.v)};
}
inline Vec<double> operator+(Vec<double> a, Vec<double> b) { return {_mm512_add_pd(a.v, b.v)}; }
inline Vec<double> operator-(Vec<double> a, Vec<double> b) { return {_mm512_sub_pd(a.v, b.v)}; }
inline Vec<double> operator*(Vec<double> a, Vec<double> b) { return {_mm512_mul_pd(a.v, b.v)}; }
// a * b + c, rounded once.
inline Vec<double> fma(Vec<double> a, Vec<double> b, Vec<double> c) {
  return {_mm512_fmadd_pd(a.v, b.v, c.v)};
}
// Whether a >= b in every lane (false where either is NaN).
inline bool all_at_least(Vec<float> a, Vec<float> b) {
  return _mm512_cmp_ps_mask(a.v, b.v, _CMP_NGE_UQ) == 0;
}
inline bool all_at_least(Vec<double> a, Vec<double> b) {
  return _mm512_cmp_pd_mask(a.v, b.v, _CMP_NGE_UQ) == 0;
}
// Lanes [0, n) of a and the others of b (0 <= n <= kLanes).
inline Vec<float> select_first(int64_t n, Vec<float> a, Vec<float> b) {
  return {_mm512_mask_blend_ps(static_cast<__mmask16>((1u << n) - 1), b.v, a.v)};
}
inline Vec<double> select_first(int64_t n, Vec<double> a, Vec<double> b) {
  return {_mm512_mask_blend_pd(static_cast<__mmask8>((1u << n) - 1), b.v, a.v)};
}
// Scalar a * b + c rounded once, as the vector fma (for the tails).
inline float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
inline double fma(double a, double b, double c) { return __builtin_fma(a, b, c); }
// Orders the non-temporal stores before whatever the thread does next.
inline void stream_fence() { _mm_sfence(); }
