// Decode-time (few-token) matrix-vector kernels for rankserve.
//
// One-token decode is bound by how fast weights stream from memory. PyTorch's M=1 linear reaches about a third
// of the memory bandwidth on our CPUs and uses one core; these kernels read each weight row once, on all threads,
// with wide loads, and keep every partial sum in fp32.
//
// Ops (registered as torch.ops.<RANKSERVE_OPS>.*; x row-major [B, in]; all tensors contiguous, on CPU, one dtype,
// float32 or bfloat16; the output has the input dtype):
//   gemv(x, W[out, in], bias?)                  y = x W^T + b
//   lowrank_gemv(x, V[r, in], U[out, r], bias?)  y = (x V^T) U^T + b, with x V^T kept in fp32
//   int8_gemv(x, q[out, in], scale, bias?, int8_act)  y = x (q * scale)^T + b, int8 weights (int8_gemv.h)
//   decode_layer(...)                            one whole decoder layer of one-token decode (decode_layer.h)
//   stream_read(x)                               the sum of a float32 tensor, read at full bandwidth (stream_read.h)
//   native_isa()                                 the vector path compiled in: avx512+bf16, avx512, avx2, scalar
// There is no transposed-weight variant: the LM head (the tied embedding, [vocab, hidden]) is already [out, in],
// and a column-blocked x @ Wt kernel reads the same bytes plus accumulator traffic; it measured no faster.
//
// ISA paths, chosen at compile time by the target flags (rankserve/runtime/native.py builds one variant per path):
//   AVX-512F (+ AVX512-BF16 vdpbf16ps for bf16 x bf16 dot products), AVX2+FMA, and plain scalar C++.
// The ops are registered in the namespace RANKSERVE_OPS (e.g. rankserve_avx2), one per variant, so that several
// variants can be loaded into one process and tested side by side.

#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
// SLEEF, as PyTorch ships and exports it: the vector exp its own CPU kernels call (Sleef_expf16_u10 under
// AVX-512, Sleef_expf8_u10 under AVX2; 1.0 ULP), so the softmax and SiLU here round like the eager path's.
#include <sleef.h>
#endif

namespace rankserve {
namespace {

using bf16 = uint16_t;  // raw bfloat16 bits; the upper half of an fp32

inline float to_f32(float v) { return v; }
inline float to_f32(int8_t v) { return static_cast<float>(v); }  // an int8 weight, before its scale
inline float to_f32(bf16 v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <typename T>
inline T from_f32(float v);
template <>
inline float from_f32<float>(float v) { return v; }
template <>
inline bf16 from_f32<bf16>(float v) { return c10::BFloat16(v).x; }  // round to nearest even

#ifndef RANKSERVE_G16
#define RANKSERVE_G16 1  // 0: int8 groups of 16 take the run-time group loop (qdot_tile), for A/B builds
#endif
#ifndef RANKSERVE_BACK_TAIL
#define RANKSERVE_BACK_TAIL 1  // 0: row tails copied through a buffer (Isa::load_tail), for A/B builds
#endif

// ---------------------------------------------------------------------------------------------------------------
// Vector layer: Isa::V holds kLanes fp32 values; loads widen bf16 to fp32 (exact: bf16 is a truncated fp32).
// ---------------------------------------------------------------------------------------------------------------
#if defined(__AVX512F__)
struct Isa {
  using V = __m512;
  static constexpr int kLanes = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const bf16* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static V load(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  // First n (< kLanes) elements, the rest zero; masked loads never touch memory past p + n.
  static V load_tail(const float* p, int n) { return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p); }
  static V load_tail(const bf16* p, int n) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    const __m256i h = _mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
#else
    bf16 buf[kLanes] = {};
    std::memcpy(buf, p, sizeof(bf16) * n);
    return load(buf);
#endif
  }
  static V load_tail(const int8_t* p, int n) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8((__mmask16)((1u << n) - 1), p)));
#else
    int8_t buf[kLanes] = {};
    std::memcpy(buf, p, n);
    return load(buf);
#endif
  }
  // Masked loads never read past p + n, so the row's start (`back`) does not matter here.
  template <typename T>
  static V load_tail(const T* p, int n, bool /*back*/) { return load_tail(p, n); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static V exp(V a) { return Sleef_expf16_u10(a); }
  static V set1(float v) { return _mm512_set1_ps(v); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static float sum(V v) { return _mm512_reduce_add_ps(v); }
};
#elif defined(__AVX2__) && defined(__FMA__)
struct Isa {
  using V = __m256;
  static constexpr int kLanes = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const bf16* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static V load(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  template <typename T>
  static V load_tail(const T* p, int n) {
    T buf[kLanes] = {};
    std::memcpy(buf, p, sizeof(T) * n);
    return load(buf);
  }
  // The n (< kLanes) elements at p in the last n lanes, the others zero. With `back` (the kLanes - n elements
  // before p are readable: a row of at least kLanes elements) it loads the kLanes elements ending at p + n and
  // zeroes the leading lanes, instead of copying through a buffer: at SmolLM2's low-rank lifts (rows of 86-251
  // values) that copy, once per row and per activation row, cost about as much as the row's dot product.
  // Weights and activations loaded this way line up lane by lane. Measured on AMD EPYC (Zen 3, 2 threads): int8
  // lifts 1.23-1.34x faster from memory, bit-identical; whole decode of int8 SVD-LLM 0.4 1.14x (10 of 10 rounds,
  // `benchmarks/kernel_ab.py DIR --a RANKSERVE_BACK_TAIL=0`).
  template <typename T>
  static V load_tail(const T* p, int n, bool back) {
    if (RANKSERVE_BACK_TAIL && back) {
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(lane, _mm256_set1_epi32(kLanes - 1 - n)));
      return _mm256_and_ps(load(p + n - kLanes), keep);
    }
    // the same last lanes as the overlapping load, so both paths sum in one order and agree bit for bit
    T buf[kLanes] = {};
    std::memcpy(buf + kLanes - n, p, sizeof(T) * n);
    return load(buf);
  }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  static V exp(V a) { return Sleef_expf8_u10(a); }
  static V set1(float v) { return _mm256_set1_ps(v); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static float sum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};
#else
struct Isa {
  using V = float;
  static constexpr int kLanes = 1;
  static V zero() { return 0.0f; }
  template <typename T>
  static V load(const T* p) { return to_f32(*p); }
  template <typename T>
  static V load_tail(const T* p, int) { return to_f32(*p); }  // never called: kLanes == 1 leaves no tail
  template <typename T>
  static V load_tail(const T* p, int, bool) { return to_f32(*p); }
  static V fma(V a, V b, V c) { return a * b + c; }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V mul(V a, V b) { return a * b; }
  static V div(V a, V b) { return a / b; }
  static V exp(V a) { return std::exp(a); }
  static V set1(float v) { return v; }
  static void store(float* p, V v) { *p = v; }
  static float sum(V v) { return v; }
};
#endif

// Software prefetch of weight rows, RANKSERVE_PF bytes ahead of the loads, once per 64-byte line of each row a
// tile reads. Dequantizing int8 costs ~3 instructions per 8 weights, so the out-of-order window covers only a few
// hundred bytes of each row and the loads alone keep too few lines in flight; the prefetch decouples the two.
// Measured on AMD EPYC (Zen 3, 2 threads), SmolLM2 decode with two builds interleaved in one process (10 rounds of
// 128 tokens, median of the per-round ratios): int8 dense 0 -> 512 bytes 1.13x (9 of 10 rounds faster); fp32
// SVD-LLM 0.4 1.06x (9 of 10); bf16 SVD-LLM 0.4 1.02x (within noise). 256 and 1024 were no better than 512.
// fp32 rows have their own distance, RANKSERVE_PF_F32, default none: on AMD EPYC Zen 4 (2 threads, 2026-12-05,
// `benchmarks/kernel_ab.py MODEL --a RANKSERVE_PF=512 --b RANKSERVE_PF=0`) dropping the prefetch made fp32 decode
// faster, dense SmolLM2 1.063x (8 of 10 rounds) and SVD-LLM 0.4 1.055x (9 of 10), while int8 SVD-LLM 0.4 lost
// (0.926x, 0 of 10) and int8 dense was even (1.013x): fp32 rows, one load per 16 weights, keep enough lines in
// flight by themselves, and the prefetches only take miss buffers the hardware prefetchers would use.
// -DRANKSERVE_PF=N, -DRANKSERVE_PF_F32=N override them (0: none): for A/B builds, and per CPU maker by the
// build (rankserve/runtime/native.py, _PREFETCH: 2048 bytes for all three on Intel Xeon).
#ifndef RANKSERVE_PF
#define RANKSERVE_PF 512
#endif
#ifndef RANKSERVE_PF_F32
#define RANKSERVE_PF_F32 0
#endif
#ifndef RANKSERVE_PF_BF16
#define RANKSERVE_PF_BF16 0  // the bf16 x bf16 tiles (vdpbf16ps); 2048 on Intel (native.py, _PREFETCH)
#endif
// The line at p + ahead into L1 (or, with hint 2 = _MM_HINT_T1, into L2); nothing without x86 vector paths.
template <int ahead, int hint = 3 /* _MM_HINT_T0 */>
inline void prefetch_at(const void* p) {
#if defined(__AVX2__) || defined(__AVX512F__)
  _mm_prefetch(static_cast<const char*>(p) + ahead, static_cast<_mm_hint>(hint));
#else
  (void)p;
#endif
}
template <typename T>
inline void prefetch_ahead(const T* p) {
  constexpr int ahead = std::is_same_v<T, float> ? RANKSERVE_PF_F32 : RANKSERVE_PF;
  if constexpr (ahead > 0) prefetch_at<ahead>(p);
}

constexpr int kRows = 4;   // weight rows per tile: enough independent streams and accumulators
constexpr int kBatch = 4;  // activation rows per pass: kRows * kBatch accumulators stay in registers

// out[b * kRows + r] = dot(w[r * ldw : r * ldw + K], x[b * ldx : b * ldx + K]) for r < R, b < NB.
template <typename WT, typename XT, int R, int NB>
inline void dot_tile(const WT* w, int64_t ldw, const XT* x, int64_t ldx, int64_t K, float* out) {
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  if constexpr (std::is_same_v<WT, bf16> && std::is_same_v<XT, bf16>) {
    // vdpbf16ps: 32 bf16 products per instruction, summed pairwise into 16 fp32 lanes.
    __m512 acc[NB][R];
    for (int b = 0; b < NB; ++b)
      for (int r = 0; r < R; ++r) acc[b][r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      __m512i wv[R];
      if constexpr (RANKSERVE_PF_BF16 > 0)
        for (int r = 0; r < R; ++r) prefetch_at<RANKSERVE_PF_BF16>(w + r * ldw + k);  // 64 bytes a step
      for (int r = 0; r < R; ++r) wv[r] = _mm512_loadu_si512(w + r * ldw + k);
      for (int b = 0; b < NB; ++b) {
        const __m512i xv = _mm512_loadu_si512(x + b * ldx + k);
        for (int r = 0; r < R; ++r) acc[b][r] = _mm512_dpbf16_ps(acc[b][r], (__m512bh)wv[r], (__m512bh)xv);
      }
    }
    if (k < K) {
      const __mmask32 m = (__mmask32)((1ull << (K - k)) - 1);  // zero-filled lanes add exact zeros
      __m512i wv[R];
      for (int r = 0; r < R; ++r) wv[r] = _mm512_maskz_loadu_epi16(m, w + r * ldw + k);
      for (int b = 0; b < NB; ++b) {
        const __m512i xv = _mm512_maskz_loadu_epi16(m, x + b * ldx + k);
        for (int r = 0; r < R; ++r) acc[b][r] = _mm512_dpbf16_ps(acc[b][r], (__m512bh)wv[r], (__m512bh)xv);
      }
    }
    for (int b = 0; b < NB; ++b)
      for (int r = 0; r < R; ++r) out[b * kRows + r] = _mm512_reduce_add_ps(acc[b][r]);
    return;
  }
#endif
  using V = Isa::V;
  constexpr int L = Isa::kLanes;
  V acc[NB][R];
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < R; ++r) acc[b][r] = Isa::zero();
  int64_t k = 0;
  for (; k + L <= K; k += L) {
    if (((k * sizeof(WT)) & 63) == 0)
      for (int r = 0; r < R; ++r) prefetch_ahead(w + r * ldw + k);
    V wv[R];
    for (int r = 0; r < R; ++r) wv[r] = Isa::load(w + r * ldw + k);
    for (int b = 0; b < NB; ++b) {
      const V xv = Isa::load(x + b * ldx + k);
      for (int r = 0; r < R; ++r) acc[b][r] = Isa::fma(wv[r], xv, acc[b][r]);
    }
  }
  if (k < K) {
    const int n = static_cast<int>(K - k);
    const bool back = K >= L;
    V wv[R];
    for (int r = 0; r < R; ++r) wv[r] = Isa::load_tail(w + r * ldw + k, n, back);
    for (int b = 0; b < NB; ++b) {
      const V xv = Isa::load_tail(x + b * ldx + k, n, back);
      for (int r = 0; r < R; ++r) acc[b][r] = Isa::fma(wv[r], xv, acc[b][r]);
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < R; ++r) out[b * kRows + r] = Isa::sum(acc[b][r]);
}

// Calls f.template operator()<R, NB>() with rows (<= kRows) and nb (<= kBatch) as compile-time constants, so
// that every tile kernel's accumulators stay in registers.
template <int R, typename F>
inline void with_nb(int nb, F&& f) {
  switch (nb) {
    case 1: return f.template operator()<R, 1>();
    case 2: return f.template operator()<R, 2>();
    case 3: return f.template operator()<R, 3>();
    default: return f.template operator()<R, kBatch>();
  }
}

template <typename F>
inline void with_tile_shape(int rows, int nb, F&& f) {
  static_assert(kRows == 4 && kBatch == 4, "the switches assume 4 rows and 4 activation rows per tile");
  switch (rows) {
    case 1: return with_nb<1>(nb, f);
    case 2: return with_nb<2>(nb, f);
    case 3: return with_nb<3>(nb, f);
    default: return with_nb<kRows>(nb, f);
  }
}

// Row tiles of an N-row matrix. Tile t < Q = N / kRows holds rows {t, t + Q, t + 2Q, t + 3Q}; the last N % kRows
// rows form one contiguous partial tile. Under a static schedule each thread thus walks kRows separate regions
// of W, each in address order: long sequential streams that the prefetchers follow, where kRows adjacent rows per
// tile would be kRows short streams. With 1 GB of distinct weights (benchmarks/kernel_bandwidth.py) this
// streamed 30-75% faster on SmolLM2's 576-wide matrices and the LM head, and the same on 1B-shape ones.
//
// The low-rank lifts (rows one rank vector long, 86-251 values at SmolLM2's ranks) take these 4-row tiles too. An
// AVX-512 "wide tile" (16 rows reduced together, one vector store) ran them 1.4-1.7x faster from cache, but in
// decode, from memory, it was slower: without it SVD-LLM 0.4 decoded 1.14-1.19x faster in fp32 and 1.20-1.23x in
// bf16 (AMD EPYC Zen 4, 2 threads, read probe 33 GB/s, `benchmarks/kernel_ab.py` A/B, 8 of 8 rounds each; with
// software prefetch in the wide tiles too). Removed.

// The rows of one tile: rows n0, n0 + step, ..., n0 + (rows - 1) * step.
struct TileRows {
  int64_t n0, step;
  int rows;
};

// Tile t of the strided layout described above.
inline TileRows strided_tile(int64_t t, int64_t N) {
  const int64_t Q = N / kRows;
  if (t < Q) return {t, Q, kRows};
  return {Q * kRows, 1, static_cast<int>(N - Q * kRows)};
}

inline int64_t strided_tile_count(int64_t N) { return N / kRows + (N % kRows != 0); }

// y[b, n] = out[b, r] (* row_scale[b]) (+ bias[n]) for the rows n of one tile, for every group of kBatch activation
// rows: dot(b0, nb, out) fills out[b * kRows + r] with the tile's dot products against rows b0 .. b0 + nb - 1.
template <typename YT, typename BT, typename Dot>
inline void tile_out(const TileRows& tr, int64_t B, const float* row_scale, const BT* bias, YT* y, int64_t ldy,
                     Dot&& dot) {
  for (int64_t b0 = 0; b0 < B; b0 += kBatch) {
    const int nb = static_cast<int>(std::min<int64_t>(kBatch, B - b0));
    float out[kBatch * kRows];
    dot(b0, nb, out);
    for (int b = 0; b < nb; ++b)
      for (int r = 0; r < tr.rows; ++r) {
        const int64_t n = tr.n0 + r * tr.step;
        const float d = row_scale ? out[b * kRows + r] * row_scale[b0 + b] : out[b * kRows + r];
        y[(b0 + b) * ldy + n] = from_f32<YT>(d + (bias ? to_f32(bias[n]) : 0.0f));
      }
  }
}

// y[b, n] = sum_k W[n, k] x[b, k] (+ bias[n]) for the rows n of tile t of W [N, K]; x [B, K] with row stride ldx,
// y with row stride ldy. Each weight tile is loaded from memory once and reused, from L1/L2, for every group of
// kBatch activation rows.
template <typename WT, typename XT, typename YT>
inline void matvec_tile(int64_t t, const WT* W, int64_t N, int64_t K, const XT* x, int64_t ldx, int64_t B,
                        const WT* bias, YT* y, int64_t ldy) {
  const TileRows tr = strided_tile(t, N);
  tile_out(tr, B, nullptr, bias, y, ldy, [&](int64_t b0, int nb, float* out) {
    with_tile_shape(tr.rows, nb, [&]<int R, int NB>() {
      dot_tile<WT, XT, R, NB>(W + tr.n0 * K, tr.step * K, x + b0 * ldx, ldx, K, out);
    });
  });
}

// The whole of y = x W^T (+ bias) as an orphaned `omp for`: called inside a parallel region it splits the row
// tiles over the team; called outside one it runs serially.
template <typename WT, typename XT, typename YT>
void matvec_rows(const WT* W, int64_t N, int64_t K, const XT* x, int64_t B, const WT* bias, YT* y,
                 int64_t ldy) {
  const int64_t ntiles = strided_tile_count(N);
#pragma omp for schedule(static)
  for (int64_t t = 0; t < ntiles; ++t) matvec_tile<WT, XT, YT>(t, W, N, K, x, K, B, bias, y, ldy);
}

// Below this many weight bytes a call is too short to pay for waking a second thread (~a few microseconds).
constexpr int64_t kParallelMinBytes = 64 * 1024;

inline int team_size(int64_t weight_bytes) {
  return weight_bytes >= kParallelMinBytes ? std::max(1, at::get_num_threads()) : 1;
}

template <typename T>
void gemv_kernel(const T* x, int64_t B, int64_t K, const T* W, int64_t N, const T* bias, T* y) {
  const int nt = team_size(N * K * static_cast<int64_t>(sizeof(T)));
#pragma omp parallel num_threads(nt) if (nt > 1)
  matvec_rows<T, T, T>(W, N, K, x, B, bias, y, N);
}

template <typename T>
void lowrank_kernel(const T* x, int64_t B, int64_t K, const T* V, int64_t R, const T* U, int64_t N,
                    const T* bias, T* y) {
  // t = x V^T stays fp32 (B * r floats: in cache), so the low-rank path rounds only once, at the output.
  std::vector<float> t(static_cast<size_t>(B * R));
  const int nt = team_size((R * K + N * R) * static_cast<int64_t>(sizeof(T)));
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    matvec_rows<T, T, float>(V, R, K, x, B, nullptr, t.data(), R);
    // The implicit barrier at the end of the `omp for` above makes all of t visible here.
    matvec_rows<T, float, T>(U, N, R, t.data(), B, bias, y, N);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Input checks and op entry points.
// ---------------------------------------------------------------------------------------------------------------
void check_operand(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), "rankserve::", op, ": ", name, " must be a CPU tensor, got device ",
              t.device());
  TORCH_CHECK(t.dim() == dim, "rankserve::", op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "rankserve::", op, ": ", name, " has dtype ", t.scalar_type(),
              " but x has dtype ", dtype, "; all inputs must share one dtype");
  TORCH_CHECK(t.is_contiguous(), "rankserve::", op, ": ", name, " must be contiguous (shape ", t.sizes(),
              ", strides ", t.strides(), ")");
}

at::ScalarType check_x(const char* op, const at::Tensor& x) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "rankserve::", op,
              ": x must be float32 or bfloat16, got ", dtype);
  check_operand(op, "x", x, dtype, 2);
  return dtype;
}

void check_bias(const char* op, const std::optional<at::Tensor>& bias, at::ScalarType dtype, int64_t out) {
  if (!bias.has_value()) return;
  check_operand(op, "bias", *bias, dtype, 1);
  TORCH_CHECK(bias->size(0) == out, "rankserve::", op, ": bias has ", bias->size(0), " elements but the output has ",
              out, " features");
}

template <typename T>
const T* data_of(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}
template <typename T>
const T* data_of(const std::optional<at::Tensor>& t) {
  return t.has_value() ? data_of<T>(*t) : nullptr;
}
template <typename T>
T* mutable_data_of(at::Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}

at::Tensor gemv(const at::Tensor& x, const at::Tensor& W, const std::optional<at::Tensor>& bias) {
  const auto dtype = check_x("gemv", x);
  check_operand("gemv", "W", W, dtype, 2);
  TORCH_CHECK(W.size(1) == x.size(1), "rankserve::gemv: x is ", x.sizes(), " but W is ", W.sizes(),
              "; W must be [out, in] with in == x.size(1) = ", x.size(1));
  check_bias("gemv", bias, dtype, W.size(0));
  const int64_t B = x.size(0), K = x.size(1), N = W.size(0);
  at::Tensor y = at::empty({B, N}, x.options());
  if (dtype == at::kFloat)
    gemv_kernel<float>(data_of<float>(x), B, K, data_of<float>(W), N, data_of<float>(bias), mutable_data_of<float>(y));
  else
    gemv_kernel<bf16>(data_of<bf16>(x), B, K, data_of<bf16>(W), N, data_of<bf16>(bias), mutable_data_of<bf16>(y));
  return y;
}

at::Tensor lowrank_gemv(const at::Tensor& x, const at::Tensor& V, const at::Tensor& U,
                        const std::optional<at::Tensor>& bias) {
  const auto dtype = check_x("lowrank_gemv", x);
  check_operand("lowrank_gemv", "V", V, dtype, 2);
  check_operand("lowrank_gemv", "U", U, dtype, 2);
  TORCH_CHECK(V.size(1) == x.size(1), "rankserve::lowrank_gemv: x is ", x.sizes(), " but V is ", V.sizes(),
              "; V must be [r, in] with in == x.size(1) = ", x.size(1));
  TORCH_CHECK(U.size(1) == V.size(0), "rankserve::lowrank_gemv: V is ", V.sizes(), " but U is ", U.sizes(),
              "; U must be [out, r] with r == V.size(0) = ", V.size(0));
  check_bias("lowrank_gemv", bias, dtype, U.size(0));
  const int64_t B = x.size(0), K = x.size(1), R = V.size(0), N = U.size(0);
  at::Tensor y = at::empty({B, N}, x.options());
  if (dtype == at::kFloat)
    lowrank_kernel<float>(data_of<float>(x), B, K, data_of<float>(V), R, data_of<float>(U), N, data_of<float>(bias),
                          mutable_data_of<float>(y));
  else
    lowrank_kernel<bf16>(data_of<bf16>(x), B, K, data_of<bf16>(V), R, data_of<bf16>(U), N, data_of<bf16>(bias),
                         mutable_data_of<bf16>(y));
  return y;
}

// Which vector path this build uses, for logs and benchmark tables.
std::string isa() {
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  return "avx512+bf16";
#elif defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#else
  return "scalar";
#endif
}

#define RANKSERVE_STR(x) #x
#define RANKSERVE_XSTR(x) RANKSERVE_STR(x)
#define RANKSERVE_OPS_NAME RANKSERVE_XSTR(RANKSERVE_OPS)  // the op namespace as a string

#include "int8_gemv.h"
#include "stream_read.h"
#include "decode_layer.h"

}  // namespace
}  // namespace rankserve

#ifndef RANKSERVE_OPS
#error "build with -DRANKSERVE_OPS=<op namespace> (rankserve/runtime/native.py does)"
#endif
// TORCH_LIBRARY pastes its namespace argument unexpanded; one more macro level expands RANKSERVE_OPS first.
#define RANKSERVE_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define RANKSERVE_LIBRARY_IMPL(ns, k, m) TORCH_LIBRARY_IMPL(ns, k, m)

RANKSERVE_LIBRARY(RANKSERVE_OPS, m) {
  m.def("gemv(Tensor x, Tensor W, Tensor? bias=None) -> Tensor");
  m.def("lowrank_gemv(Tensor x, Tensor V, Tensor U, Tensor? bias=None) -> Tensor");
  m.def("native_isa() -> str", &rankserve::isa);
  m.def("int8_gemv(Tensor x, Tensor q, Tensor scale, Tensor? bias=None, bool int8_act=False) -> Tensor");
  m.def("stream_read(Tensor x) -> float");
  m.class_<rankserve::LayerStack>("LayerStack")
      .def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>, std::vector<double>, int64_t, int64_t, double>())
      .def("decode", &rankserve::LayerStack::decode)
      .def("set_ends", &rankserve::LayerStack::set_ends)
      .def("step", &rankserve::LayerStack::step);
  m.def(
      "decode_layer(Tensor x, Tensor w_in, Tensor w_post, float eps, "
      "Tensor qkv_first, Tensor? qkv_first_scale, Tensor[] qkv_lifts, Tensor[] qkv_lift_scales, int[] qkv_splits, "
      "Tensor? qkv_bias, Tensor o_first, Tensor? o_first_scale, Tensor[] o_lifts, Tensor[] o_lift_scales, "
      "int[] o_splits, Tensor? o_bias, Tensor gu_first, Tensor? gu_first_scale, Tensor[] gu_lifts, "
      "Tensor[] gu_lift_scales, int[] gu_splits, Tensor? gu_bias, Tensor down_first, Tensor? down_first_scale, "
      "Tensor[] down_lifts, Tensor[] down_lift_scales, int[] down_splits, Tensor? down_bias, "
      "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cos, Tensor sin, "
      "Tensor slot, Tensor valid_from, int n_heads, int n_kv, float scale) -> Tensor");
}

RANKSERVE_LIBRARY_IMPL(RANKSERVE_OPS, CPU, m) {
  m.impl("gemv", &rankserve::gemv);
  m.impl("lowrank_gemv", &rankserve::lowrank_gemv);
  m.impl("decode_layer", &rankserve::decode_layer);
  m.impl("int8_gemv", &rankserve::int8_gemv);
  m.impl("stream_read", &rankserve::stream_read);
}
