// int8-weight matrix-vector kernels, in the layout of rankserve/quant.py: q int8 [N, K] row-major and scale fp32
// [N, groups], W[n, k] ~= q[n, k] * scale[n, k / G] with G = K / groups (groups == 1: one scale per row).
//
// Included by kernels.cpp inside its anonymous namespace (it uses Isa, TileRows, tile_out, with_tile_shape).
// Two ways to take the dot products, chosen per call:
//   dequantizing: each int8 weight is widened to fp32 in registers and multiplied into fp32 (or bf16) activations;
//     the sum of each group is scaled once. This is the eager reference's numerics up to fp32 summation order.
//   int8 activations: each activation row is quantized to int8 (per row, as quantize_int8 quantizes a weight row),
//     and 4-product integer dot products (AVX2 vpmaddubsw + vpmaddwd, AVX-512 VNNI vpdpbusd) are summed exactly
//     in int32 per group, then scaled by the weight's and the row's scales. Cheaper per byte, different numerics.

// One int8 matrix: q [N, K] and scale [N, groups].
struct QMat {
  const int8_t* q;
  const float* scale;
  int64_t groups;
};

// q[:K] = round(x / s) clamped to [-127, 127] with s = max|x| / 127; returns s. The same fp32 operations as
// rankserve.quant.quantize_int8 on one row (scale, its reciprocal, round half to even), so tests can rebuild it.
template <typename XT>
inline float quantize_row(const XT* x, int64_t K, int8_t* q) {
  float amax = 0.0f;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(to_f32(x[k])));
  const float s = amax / 127.0f;
  const float inv = s > 0.0f ? 1.0f / s : 0.0f;
  for (int64_t k = 0; k < K; ++k)
    q[k] = static_cast<int8_t>(std::clamp(std::nearbyint(to_f32(x[k]) * inv), -127.0f, 127.0f));
  return s;
}

// Dequantizing tile: out[b * kRows + r] = sum_g scale[r, g] * sum_{k in g} q[r, k] x[b, k], fp32 accumulators.
// GS > 0: the group size G as a compile-time constant (a multiple of kLanes), so a group's few vectors are
// unrolled with no loop or tail test. The first factors' groups of 16 (AMD EPYC, Zen 3): 1.12-1.18x faster per
// matrix from memory, decode of int8 SVD-LLM 0.4 1.03x (7 of 10 rounds, `kernel_ab.py DIR --a RANKSERVE_G16=0`).
template <typename XT, int R, int NB, int GS = 0>
inline void qdot_tile(const int8_t* w, int64_t ldw, const float* sc, int64_t ldsc, int64_t G, const XT* x, int64_t ldx,
                      int64_t K, float* out) {
  static_assert(GS % Isa::kLanes == 0, "a compile-time group size must be a multiple of the vector width");
  if constexpr (GS > 0) G = GS;
  using V = Isa::V;
  constexpr int L = Isa::kLanes;
  V acc[NB][R];
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < R; ++r) acc[b][r] = Isa::zero();
  for (int64_t g0 = 0, gi = 0; g0 < K; g0 += G, ++gi) {
    V part[NB][R];
    for (int b = 0; b < NB; ++b)
      for (int r = 0; r < R; ++r) part[b][r] = Isa::zero();
    const int64_t end = g0 + G;
    int64_t k = g0;
    auto step = [&](int64_t k) {
      if ((k & 63) == 0)
        for (int r = 0; r < R; ++r) prefetch_ahead(w + r * ldw + k);
      V wv[R];
      for (int r = 0; r < R; ++r) wv[r] = Isa::load(w + r * ldw + k);
      for (int b = 0; b < NB; ++b) {
        const V xv = Isa::load(x + b * ldx + k);
        for (int r = 0; r < R; ++r) part[b][r] = Isa::fma(wv[r], xv, part[b][r]);
      }
    };
    if constexpr (GS > 0) {
      for (int u = 0; u < GS / L; ++u) step(k + u * L);
      k = end;
    } else {
      for (; k + L <= end; k += L) step(k);
    }
    if (k < end) {
      const int n = static_cast<int>(end - k);
      const bool back = K >= L;  // reads back into earlier columns (of this row), masked to zero
      V wv[R];
      for (int r = 0; r < R; ++r) wv[r] = Isa::load_tail(w + r * ldw + k, n, back);
      for (int b = 0; b < NB; ++b) {
        const V xv = Isa::load_tail(x + b * ldx + k, n, back);
        for (int r = 0; r < R; ++r) part[b][r] = Isa::fma(wv[r], xv, part[b][r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const V s = Isa::set1(sc[r * ldsc + gi]);
      for (int b = 0; b < NB; ++b) acc[b][r] = Isa::fma(part[b][r], s, acc[b][r]);
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < R; ++r) out[b * kRows + r] = Isa::sum(acc[b][r]);
}

// Integer dot products of int8 vectors. Q::V holds int32 sums of 4 adjacent byte products per lane; Q::Act is an
// activation vector prepared once and multiplied into every weight row. The x86 instructions multiply unsigned by
// signed bytes, so |x| is the unsigned operand and the weight takes x's sign. With both sides in [-127, 127] a pair
// of products is at most 2 * 127 * 127 = 32258: vpmaddubsw's int16 saturation is never reached.
#if defined(__AVX512F__)
#if !defined(__AVX512BW__)
#error "the AVX-512 int8 path needs AVX512BW (byte compares and maddubs)"
#endif
struct Q {
  using V = __m512i;
  static constexpr int kBytes = 64;
  struct Act {
    __m512i abs;
    __mmask64 neg;
  };
  static V zero() { return _mm512_setzero_si512(); }
  static V load(const int8_t* p) { return _mm512_loadu_si512(p); }
  static V load_tail(const int8_t* p, int n) { return _mm512_maskz_loadu_epi8((__mmask64)((1ull << n) - 1), p); }
  static Act act(V x) { return {_mm512_abs_epi8(x), _mm512_movepi8_mask(x)}; }
  static V dot(V acc, const Act& x, V w) {
    const V sw = _mm512_mask_sub_epi8(w, x.neg, _mm512_setzero_si512(), w);  // w * sign(x)
#if defined(__AVX512VNNI__)
    return _mm512_dpbusd_epi32(acc, x.abs, sw);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(x.abs, sw), _mm512_set1_epi16(1)));
#endif
  }
  static Isa::V to_float(V v) { return _mm512_cvtepi32_ps(v); }
};
#elif defined(__AVX2__) && defined(__FMA__)
struct Q {
  using V = __m256i;
  static constexpr int kBytes = 32;
  struct Act {
    __m256i abs, x;
  };
  static V zero() { return _mm256_setzero_si256(); }
  static V load(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static V load_tail(const int8_t* p, int n) {
    alignas(32) int8_t buf[kBytes] = {};
    std::memcpy(buf, p, n);
    return load(buf);
  }
  static Act act(V x) { return {_mm256_abs_epi8(x), x}; }
  static V dot(V acc, const Act& x, V w) {
    const V prod = _mm256_maddubs_epi16(x.abs, _mm256_sign_epi8(w, x.x));  // int16 pairs, see above
    return _mm256_add_epi32(acc, _mm256_madd_epi16(prod, _mm256_set1_epi16(1)));
  }
  static Isa::V to_float(V v) { return _mm256_cvtepi32_ps(v); }
};
#else
struct Q {
  using V = int32_t;
  static constexpr int kBytes = 1;
  using Act = int32_t;
  static V zero() { return 0; }
  static V load(const int8_t* p) { return *p; }
  static V load_tail(const int8_t* p, int) { return *p; }  // never called: kBytes == 1 leaves no tail
  static Act act(V x) { return x; }
  static V dot(V acc, Act x, V w) { return acc + x * w; }
  static Isa::V to_float(V v) { return static_cast<float>(v); }
};
#endif

// int8-activation tile: out[b * kRows + r] = sum_g scale[r, g] * (exact int32 sum_{k in g} q[r, k] xq[b, k]); the
// caller multiplies by the activation row's scale. Groups of up to 2^17 columns cannot overflow the int32 lanes.
template <int R, int NB>
inline void idot_tile(const int8_t* w, int64_t ldw, const float* sc, int64_t ldsc, int64_t G, const int8_t* x,
                      int64_t ldx, int64_t K, float* out) {
  Isa::V acc[NB][R];
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < R; ++r) acc[b][r] = Isa::zero();
  for (int64_t g0 = 0, gi = 0; g0 < K; g0 += G, ++gi) {
    Q::V part[NB][R];
    for (int b = 0; b < NB; ++b)
      for (int r = 0; r < R; ++r) part[b][r] = Q::zero();
    const int64_t end = g0 + G;
    int64_t k = g0;
    for (; k + Q::kBytes <= end; k += Q::kBytes) {
      if ((k & 63) == 0)
        for (int r = 0; r < R; ++r) prefetch_ahead(w + r * ldw + k);
      Q::V wv[R];
      for (int r = 0; r < R; ++r) wv[r] = Q::load(w + r * ldw + k);
      for (int b = 0; b < NB; ++b) {
        const Q::Act xa = Q::act(Q::load(x + b * ldx + k));
        for (int r = 0; r < R; ++r) part[b][r] = Q::dot(part[b][r], xa, wv[r]);
      }
    }
    if (k < end) {
      const int n = static_cast<int>(end - k);
      Q::V wv[R];
      for (int r = 0; r < R; ++r) wv[r] = Q::load_tail(w + r * ldw + k, n);
      for (int b = 0; b < NB; ++b) {
        const Q::Act xa = Q::act(Q::load_tail(x + b * ldx + k, n));
        for (int r = 0; r < R; ++r) part[b][r] = Q::dot(part[b][r], xa, wv[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const Isa::V s = Isa::set1(sc[r * ldsc + gi]);
      for (int b = 0; b < NB; ++b) acc[b][r] = Isa::fma(Q::to_float(part[b][r]), s, acc[b][r]);
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < R; ++r) out[b * kRows + r] = Isa::sum(acc[b][r]);
}

// y[b, n] = x[b] . W[n] (+ bias[n]) for the rows n of strided tile t of the int8 matrix W. With XT = int8_t, x holds
// activation rows quantized by quantize_row and x_scale their scales (the integer path); otherwise x_scale is null.
template <typename XT, typename YT, typename BT>
inline void qmatvec_tile(int64_t t, const QMat& W, int64_t N, int64_t K, const XT* x, int64_t ldx,
                         const float* x_scale, int64_t B, const BT* bias, YT* y, int64_t ldy) {
  const TileRows tr = strided_tile(t, N);
  const int64_t G = K / W.groups;
  const int8_t* w = W.q + tr.n0 * K;
  const float* sc = W.scale + tr.n0 * W.groups;
  tile_out(tr, B, x_scale, bias, y, ldy, [&](int64_t b0, int nb, float* out) {
    with_tile_shape(tr.rows, nb, [&]<int R, int NB>() {
      if constexpr (std::is_same_v<XT, int8_t>)
        idot_tile<R, NB>(w, tr.step * K, sc, tr.step * W.groups, G, x + b0 * ldx, ldx, K, out);
      else if (RANKSERVE_G16 && G == 16)  // the first factors' default groups (rankserve/quant.py)
        qdot_tile<XT, R, NB, 16>(w, tr.step * K, sc, tr.step * W.groups, G, x + b0 * ldx, ldx, K, out);
      else
        qdot_tile<XT, R, NB>(w, tr.step * K, sc, tr.step * W.groups, G, x + b0 * ldx, ldx, K, out);
    });
  });
}

template <typename T>
void int8_gemv_kernel(const T* x, int64_t B, int64_t K, const QMat& W, int64_t N, const T* bias, T* y,
                      bool int8_act) {
  std::vector<int8_t> xq(int8_act ? B * K : 0);
  std::vector<float> xs(int8_act ? B : 0);
  for (int64_t b = 0; b < static_cast<int64_t>(xs.size()); ++b) xs[b] = quantize_row(x + b * K, K, xq.data() + b * K);
  const int64_t ntiles = strided_tile_count(N);
  const int nt = team_size(N * K);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
  for (int64_t t = 0; t < ntiles; ++t) {
    if (int8_act)
      qmatvec_tile<int8_t, T, T>(t, W, N, K, xq.data(), K, xs.data(), B, bias, y, N);
    else
      qmatvec_tile<T, T, T>(t, W, N, K, x, K, nullptr, B, bias, y, N);
  }
}

// Checks q int8 [N, K] and scale fp32 [N, groups] with groups dividing K; `name` names them in errors.
QMat check_qmat(const char* op, const char* name, const at::Tensor& q, const at::Tensor& scale) {
  TORCH_CHECK(q.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat, "rankserve::", op, ": ", name,
              " must be int8 weights with float32 scales, got ", q.scalar_type(), " and ", scale.scalar_type());
  check_operand(op, name, q, at::kChar, 2);
  check_operand(op, name, scale, at::kFloat, 2);
  const int64_t groups = scale.size(1);
  TORCH_CHECK(scale.size(0) == q.size(0) && groups >= 1 && q.size(1) % groups == 0, "rankserve::", op, ": ", name,
              " scale is ", scale.sizes(), " for int8 weights ", q.sizes(),
              "; it must be [out, groups] with groups dividing in");
  return {data_of<int8_t>(q), data_of<float>(scale), groups};
}

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                     const std::optional<at::Tensor>& bias, bool int8_act) {
  const auto dtype = check_x("int8_gemv", x);
  const QMat W = check_qmat("int8_gemv", "W", q, scale);
  TORCH_CHECK(q.size(1) == x.size(1), "rankserve::int8_gemv: x is ", x.sizes(), " but W is ", q.sizes(),
              "; W must be [out, in] with in == x.size(1) = ", x.size(1));
  check_bias("int8_gemv", bias, dtype, q.size(0));
  const int64_t B = x.size(0), K = x.size(1), N = q.size(0);
  at::Tensor y = at::empty({B, N}, x.options());
  if (dtype == at::kFloat)
    int8_gemv_kernel<float>(data_of<float>(x), B, K, W, N, data_of<float>(bias), mutable_data_of<float>(y), int8_act);
  else
    int8_gemv_kernel<bf16>(data_of<bf16>(x), B, K, W, N, data_of<bf16>(bias), mutable_data_of<bf16>(y), int8_act);
  return y;
}
