// AVX-512 wide tiles (16 rows per tile, see the comment above kWideTiles in kernels.cpp): the dot products of one
// wide tile and the 4-row loads and stores of its results. Included by kernels.cpp inside its anonymous namespace.
#if defined(__AVX512F__) && defined(__AVX512BW__)
// [sum(v[0]), sum(v[1]), ..., sum(v[15])] in 45 shuffles and adds (16 separate reductions take ~130).
inline __m512 hsum16(const __m512* v) {
  __m512 t[8], u[4];
  for (int k = 0; k < 8; ++k)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    t[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
  for (int k = 0; k < 4; ++k) {  // per 128-bit lane: the lane's partial sums of v[4k .. 4k+3]
    const __m512d a = _mm512_castps_pd(t[2 * k]), b = _mm512_castps_pd(t[2 * k + 1]);
    u[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 y01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 y23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(y01, y23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(y01, y23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// The 16 dot products of one wide tile with x [K]: row r is blk[r / 4] + (r % 4) * ldw.
template <typename WT, typename XT>
inline __m512 dot_wide(const WT* const* blk, int64_t ldw, const XT* x, int64_t K) {
  __m512 acc[kWide];
  for (int r = 0; r < kWide; ++r) acc[r] = _mm512_setzero_ps();
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<WT, bf16> && std::is_same_v<XT, bf16>) {
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      const __m512i xv = _mm512_loadu_si512(x + k);
      for (int r = 0; r < kWide; ++r)
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512(blk[r / 4] + (r % 4) * ldw + k), (__m512bh)xv);
    }
    if (k < K) {
      const __mmask32 m = (__mmask32)((1ull << (K - k)) - 1);
      const __m512i xv = _mm512_maskz_loadu_epi16(m, x + k);
      for (int r = 0; r < kWide; ++r)
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_maskz_loadu_epi16(m, blk[r / 4] + (r % 4) * ldw + k),
                                  (__m512bh)xv);
    }
    return hsum16(acc);
  }
#endif
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m512 xv = Isa::load(x + k);
    for (int r = 0; r < kWide; ++r) acc[r] = _mm512_fmadd_ps(Isa::load(blk[r / 4] + (r % 4) * ldw + k), xv, acc[r]);
  }
  if (k < K) {
    const int n = static_cast<int>(K - k);
    const __m512 xv = Isa::load_tail(x + k, n);
    for (int r = 0; r < kWide; ++r)
      acc[r] = _mm512_fmadd_ps(Isa::load_tail(blk[r / 4] + (r % 4) * ldw + k, n), xv, acc[r]);
  }
  return hsum16(acc);
}

// Four rows' values v (lanes 4i .. 4i+3 of a wide tile's result) to y + 4 rows starting at row n.
inline void store4(float* y, __m128 v) { _mm_storeu_ps(y, v); }
inline void store4(bf16* y, __m128 v) {
  // round to nearest even, as c10::BFloat16 does for finite values
  __m128i u = _mm_castps_si128(v);
  u = _mm_add_epi32(u, _mm_add_epi32(_mm_set1_epi32(0x7FFF), _mm_and_si128(_mm_srli_epi32(u, 16), _mm_set1_epi32(1))));
  u = _mm_srli_epi32(u, 16);
  const __m128i packed = _mm_packus_epi32(u, u);  // values are < 65536: no saturation
  _mm_storel_epi64(reinterpret_cast<__m128i*>(y), packed);
}
inline __m128 load4(const float* p) { return _mm_loadu_ps(p); }
inline __m128 load4(const bf16* p) {
  const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h), 16));
}
#endif
