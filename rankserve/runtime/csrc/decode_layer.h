// One whole decoder layer for one-token decode, in one OpenMP parallel region.
//
// Included by kernels.cpp inside its anonymous namespace (it uses Isa, matvec_tile, to_f32/from_f32, data_of).
// Calling a GEMV op per projection costs a thread wake-up, a barrier and a dispatcher round trip each time; at
// SmolLM2's sizes (a 576x576 matrix streams in ~30 us) that overhead is as large as the work. Here a layer is
// one region: every stage splits its work (row tiles, cache rows, columns) over the threads, and the stages are
// separated only by the barriers between them.
//
// Semantics match the eager model (rankserve/models/llama.py) at one token per row:
//   h   = rmsnorm(x) * w_in
//   q,k,v = packed projections of h (dense members: one GEMV; low-rank members: V stage then U lift)
//   q,k = rope(q, k); k,v written to the cache at `slot`; o = attention over slots [valid_from_b, slot]
//   x  += o_proj(o)
//   h   = rmsnorm(x) * w_post
//   x  += down(silu(gate(h)) * up(h))
// Values are rounded to the model dtype wherever the eager path rounds them, the low-rank rank vector included.
// Any first stage or lift may be int8 (q + fp32 scales, rankserve/quant.py): it is dequantized in registers
// (int8_gemv.h), so the layer matches the eager path's dequantized matrices up to fp32 summation order.

#include <omp.h>

#include <cmath>

// A matrix-vector job: y[b, :N] (row stride ldy) = x[b, :K] (row stride ldx) W[N, K]^T (+ bias). W is either
// in T, or int8 (qw.q set, W null) and dequantized in registers (int8_gemv.h).
template <typename T>
struct Seg {
  const T* W;
  int64_t N, K;
  const T* x;
  int64_t ldx;
  T* y;
  int64_t ldy;
  const T* bias;  // or null
  QMat qw{nullptr, nullptr, 0};
};

// Jobs that run between the same two barriers, as one split of the row tiles of every job (see matvec_tile)
// numbered across the jobs. Built before the parallel region, so that no thread allocates in it.
//
// Each thread takes a contiguous run of tiles holding an equal share of the stage's weight bytes, not an equal
// count of tiles: the members of a stage differ in row length (a q lift has 4x the rows of a k lift at up to 2x
// the rank; loss-driven ranks give gate and up lifts different lengths), and `omp for schedule(static)` gave one
// thread up to 62% of a stage's bytes. -DRANKSERVE_BALANCE=0 restores the equal count of tiles, for A/B builds.
#ifndef RANKSERVE_BALANCE
#define RANKSERVE_BALANCE 1
#endif
#ifndef RANKSERVE_FOLD_RESIDUAL
#define RANKSERVE_FOLD_RESIDUAL 1  // 0: every layer of a stack adds its own last residual (run_layer), for A/B builds
#endif
#ifndef RANKSERVE_FUSE_SILU
#define RANKSERVE_FUSE_SILU 1  // 0: the SiLU product as a stage of its own (plan_stages), for A/B builds
#endif
template <typename T>
struct Stage {
  std::vector<Seg<T>> segs;
  std::vector<int64_t> first_tile{0};  // first_tile[i]: number of segs[i]'s first tile; back(): all tiles
  std::vector<int64_t> first_byte{0};  // first_byte[i]: weight bytes of the tiles before segs[i]'s

  void add(const Seg<T>& s) {
    segs.push_back(s);
    first_tile.push_back(first_tile.back() + strided_tile_count(s.N));
    first_byte.push_back(first_byte.back() + s.N * s.K * (s.qw.q ? 1 : static_cast<int64_t>(sizeof(T))));
  }
  bool empty() const { return segs.empty(); }
  bool paired = false;  // see run(B, after)

  // The first tile whose weight bytes start at or after `byte` (a tile of kRows rows costs kRows row lengths; a
  // partial last tile is counted as whole, a few rows' error).
  int64_t tile_at(int64_t byte) const {
    size_t i = 0;
    while (i + 1 < segs.size() && byte >= first_byte[i + 1]) ++i;
    const int64_t tiles = first_tile[i + 1] - first_tile[i], seg_bytes = first_byte[i + 1] - first_byte[i];
    const int64_t in_seg = std::clamp<int64_t>(byte - first_byte[i], 0, seg_bytes);
    return first_tile[i] + (seg_bytes > 0 ? (in_seg * tiles + seg_bytes - 1) / seg_bytes : 0);
  }

  void run_tile(int64_t t, size_t& i, int64_t B) const {
    while (t >= first_tile[i + 1]) ++i;
    const Seg<T>& s = segs[i];
    if (s.qw.q)
      qmatvec_tile<T, T, T>(t - first_tile[i], s.qw, s.N, s.K, s.x, s.ldx, nullptr, B, s.bias, s.y, s.ldy);
    else
      matvec_tile<T, T, T>(t - first_tile[i], s.W, s.N, s.K, s.x, s.ldx, B, s.bias, s.y, s.ldy);
  }

  // Must be called by every thread of the team; ends with a barrier. A paired stage (the gate and up outputs:
  // two jobs with the same rows) gives every thread the same range of tiles of both jobs, and each thread then
  // calls after(lo, hi) on its range before the barrier: the SiLU product of the rows it wrote itself.
  template <typename After>
  void run(int64_t B, After&& after) const {
    if (paired) {
      const int64_t id = omp_get_thread_num(), team = omp_get_num_threads(), n = first_tile[1];
      const int64_t lo = n * id / team, hi = n * (id + 1) / team;
      for (size_t j = 0; j < 2; ++j) {
        size_t i = j;
        for (int64_t t = lo; t < hi; ++t) run_tile(first_tile[j] + t, i, B);
      }
      after(lo, hi);
#pragma omp barrier
      return;
    }
    run(B);
  }

  void run(int64_t B) const {
#if RANKSERVE_BALANCE
    const int64_t id = omp_get_thread_num(), team = omp_get_num_threads(), bytes = first_byte.back();
    const int64_t lo = tile_at(bytes * id / team);
    const int64_t hi = id + 1 == team ? first_tile.back() : tile_at(bytes * (id + 1) / team);
    size_t i = 0;
    for (int64_t t = lo; t < hi; ++t) run_tile(t, i, B);
#pragma omp barrier
#else
    const int64_t ntiles = first_tile.back();
#pragma omp for schedule(static)
    for (int64_t t = 0; t < ntiles; ++t) {
      size_t i = 0;
      run_tile(t, i, B);
    }
#endif
  }
};

// acc[:n] += p * v[:n] with acc in fp32.
template <typename T>
inline void axpy_f32(float p, const T* v, float* acc, int64_t n) {
  const Isa::V pv = Isa::set1(p);
  int64_t j = 0;
  for (; j + Isa::kLanes <= n; j += Isa::kLanes) Isa::store(acc + j, Isa::fma(pv, Isa::load(v + j), Isa::load(acc + j)));
  for (; j < n; ++j) acc[j] += p * to_f32(v[j]);
}

template <typename T>
inline T round_t(float v) {
  return from_f32<T>(v);
}

// A packed group of projections reading one input: first stages stacked in `first` [sum rows_i, K]; member i
// is dense when lifts[i] is empty (its rows of `first` are its output), else low-rank with lift [out_i, r_i].
// Any of these matrices may be int8 (q with fp32 scales [rows, groups]; then its T pointer is null).
template <typename T>
struct Group {
  const T* first;
  QMat qfirst{nullptr, nullptr, 0};
  int64_t K;
  std::vector<int64_t> rows;   // rows of `first` per member
  std::vector<const T*> lift;  // null for dense members and int8 lifts
  std::vector<QMat> qlift;     // q null unless the lift is int8
  std::vector<int64_t> out;    // output features per member
  const T* bias;               // [sum out_i] or null
  int64_t total_out = 0;
  int64_t total_rank = 0;      // rows of low-rank members (scratch size per activation row)
};

// A matrix of a group: int8 when it is int8 (its scale required), else in the model dtype.
template <typename T>
std::pair<const T*, QMat> group_matrix(const at::Tensor& w, const at::Tensor* scale, const char* name,
                                       at::ScalarType dtype) {
  if (w.scalar_type() != at::kChar) {
    check_operand("decode_layer", name, w, dtype, 2);
    return {data_of<T>(w), QMat{nullptr, nullptr, 0}};
  }
  TORCH_CHECK(scale != nullptr && scale->numel() > 0, "rankserve::decode_layer: ", name,
              " is int8 but has no scale");
  return {nullptr, check_qmat("decode_layer", name, w, *scale)};
}

template <typename T>
Group<T> make_group(const at::Tensor& first, const std::optional<at::Tensor>& first_scale,
                    const std::vector<at::Tensor>& lifts, const std::vector<at::Tensor>& lift_scales,
                    c10::IntArrayRef splits, const std::optional<at::Tensor>& bias, const char* name,
                    at::ScalarType dtype) {
  TORCH_CHECK(static_cast<int64_t>(lifts.size()) == static_cast<int64_t>(splits.size()) || lifts.empty(),
              "rankserve::decode_layer: ", name, " has ", lifts.size(), " lifts for ", splits.size(), " members");
  TORCH_CHECK(lift_scales.empty() || lift_scales.size() == lifts.size(), "rankserve::decode_layer: ", name,
              " has ", lift_scales.size(), " lift scales for ", lifts.size(), " lifts");
  Group<T> g;
  std::tie(g.first, g.qfirst) = group_matrix<T>(first, first_scale ? &*first_scale : nullptr, name, dtype);
  g.K = first.size(1);
  int64_t sum = 0;
  for (size_t i = 0; i < splits.size(); ++i) {
    const int64_t r = splits[i];
    g.rows.push_back(r);
    sum += r;
    const bool low = !lifts.empty() && lifts[i].numel() > 0;
    if (low) {
      const auto [w, qw] = group_matrix<T>(lifts[i], lift_scales.empty() ? nullptr : &lift_scales[i], name, dtype);
      TORCH_CHECK(lifts[i].size(1) == r, "rankserve::decode_layer: ", name, " member ", i, " lift is ",
                  lifts[i].sizes(), " but its first stage has ", r, " rows");
      g.lift.push_back(w);
      g.qlift.push_back(qw);
      g.out.push_back(lifts[i].size(0));
      g.total_rank += r;
    } else {
      g.lift.push_back(nullptr);
      g.qlift.push_back(QMat{nullptr, nullptr, 0});
      g.out.push_back(r);
    }
  }
  TORCH_CHECK(sum == first.size(0), "rankserve::decode_layer: ", name, " splits sum to ", sum, " but first has ",
              first.size(0), " rows");
  g.total_out = 0;
  for (auto o : g.out) g.total_out += o;
  g.bias = nullptr;
  if (bias.has_value()) {
    check_operand("decode_layer", name, *bias, dtype, 1);
    TORCH_CHECK(bias->size(0) == g.total_out, "rankserve::decode_layer: ", name, " bias has ", bias->size(0),
                " elements for ", g.total_out, " outputs");
    g.bias = data_of<T>(*bias);
  }
  return g;
}

// The two stages of a group applied to x [B, K] (T), writing y [B, total_out] (T); tmp holds B * total_rank
// values. First stage: dense members straight into y, low-rank first stages into tmp; second: the lifts (tmp ->
// y). The rank vector is rounded to T between them, as the eager LowRankLinear rounds F.linear(x, V) before
// F.linear(., U); in bf16 that also lets the lifts use the bf16 x bf16 dot product (vdpbf16ps) instead of
// widening every weight.
template <typename T>
void group_stages(const Group<T>& g, const T* x, T* y, T* tmp, Stage<T>& first, Stage<T>& lifts) {
  int64_t row = 0, col = 0, tcol = 0;
  for (size_t i = 0; i < g.rows.size(); ++i) {
    const T* W = g.first ? g.first + row * g.K : nullptr;
    const QMat qW = g.qfirst.q ? QMat{g.qfirst.q + row * g.K, g.qfirst.scale + row * g.qfirst.groups, g.qfirst.groups}
                               : g.qfirst;
    const T* b = g.bias ? g.bias + col : nullptr;
    if (g.lift[i] == nullptr && g.qlift[i].q == nullptr) {
      first.add({W, g.rows[i], g.K, x, g.K, y + col, g.total_out, b, qW});
    } else {
      first.add({W, g.rows[i], g.K, x, g.K, tmp + tcol, g.total_rank, nullptr, qW});
      lifts.add({g.lift[i], g.out[i], g.rows[i], tmp + tcol, g.total_rank, y + col, g.total_out, b, g.qlift[i]});
      tcol += g.rows[i];
    }
    row += g.rows[i];
    col += g.out[i];
  }
}

// out[b] = rmsnorm(x[b] (+ add[b])) * w for the B rows; with `add`, x + add (rounded to T, as the eager residual
// add rounds) is also written to sum. Every thread computes each row's sum of squares in full (D values, from
// cache) and writes its own slice of the columns, so that no thread waits while one normalizes a whole row (at
// B = 1 an `omp for` over rows left the other idle) and the residual add needs no stage of its own. In fp32,
// where the roundings to T are no-ops, the add, the sum of squares and the slice run in vectors; bf16 rounds
// every sum and product one value at a time. Must be called by every thread of the team; ends with a barrier.
template <typename T>
void rmsnorm_rows(const T* x, const T* add, const T* w, float eps, int64_t B, int64_t D, T* sum, T* out) {
  const int64_t id = omp_get_thread_num(), team = omp_get_num_threads();
  const int64_t lo = D * id / team, hi = D * (id + 1) / team;
  constexpr int L = Isa::kLanes;
  constexpr bool kVec = std::is_same_v<T, float>;
  for (int64_t b = 0; b < B; ++b) {
    const T* xr = x + b * D;
    const T* ar = add ? add + b * D : nullptr;
    auto value = [&](int64_t d) { return ar ? to_f32(round_t<T>(to_f32(xr[d]) + to_f32(ar[d]))) : to_f32(xr[d]); };
    auto vvalue = [&](int64_t d) { return ar ? Isa::add(Isa::load(xr + d), Isa::load(ar + d)) : Isa::load(xr + d); };
    Isa::V ss = Isa::zero();
    float tail = 0.0f;
    int64_t d = 0;
    if (kVec || ar == nullptr)
      for (; d + L <= D; d += L) {
        const Isa::V v = vvalue(d);
        ss = Isa::fma(v, v, ss);
      }
    for (; d < D; ++d) {
      const float v = value(d);
      tail += v * v;
    }
    const float inv = 1.0f / std::sqrt((Isa::sum(ss) + tail) / static_cast<float>(D) + eps);
    d = lo;
    if constexpr (kVec)
      for (const Isa::V iv = Isa::set1(inv); d + L <= hi; d += L) {
        const Isa::V v = vvalue(d);
        if (ar) Isa::store(sum + b * D + d, v);
        Isa::store(out + b * D + d, Isa::mul(Isa::load(w + d), Isa::mul(v, iv)));
      }
    for (; d < hi; ++d) {
      const float v = value(d);
      if (ar) sum[b * D + d] = round_t<T>(v);
      const T normed = round_t<T>(v * inv);  // eager casts back to the model dtype first
      out[b * D + d] = round_t<T>(to_f32(w[d]) * to_f32(normed));
    }
  }
#pragma omp barrier
}

// RoPE (HF half-split layout) on one head vector in place: v [hd], cos/sin [hd] in T.
template <typename T>
inline void rope_head(T* v, const T* cos, const T* sin, int64_t hd) {
  const int64_t h = hd / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float a = to_f32(v[i]), b = to_f32(v[i + h]);
    // x * cos + rotate_half(x) * sin, each product rounded as the eager elementwise ops round
    const float ra = to_f32(round_t<T>(to_f32(round_t<T>(a * to_f32(cos[i]))) + to_f32(round_t<T>(-b * to_f32(sin[i])))));
    const float rb = to_f32(round_t<T>(to_f32(round_t<T>(b * to_f32(cos[i + h]))) + to_f32(round_t<T>(a * to_f32(sin[i + h])))));
    v[i] = round_t<T>(ra);
    v[i + h] = round_t<T>(rb);
  }
}

// Software prefetch in attention, per tile of cache rows s .. s + rows of a thread's share k, v [n, hd]: the key
// rows RANKSERVE_ATT_PF bytes ahead into L1, and the tile's value rows, which the second pass reads after every
// key, into L2. A thread's share is a few short streams (at a 128-token context, 16 KB of keys and of values per kv
// head), which the hardware prefetchers barely start on before they end. Intel Xeon (AVX-512, AMX), 2 threads,
// 2026-12-05, `benchmarks/kernel_ab.py DIR --a RANKSERVE_ATT_PF=0` (B: 2 KB): int8 SVD-LLM 0.4 1.048 (faster in 9
// of 10 rounds) from slot 64 and 1.108 (6 of 6) from slot 400, int8 dense 1.023 (8/8), fp32 SVD-LLM 0.4 1.011
// (6/8). Keys 1 KB ahead with the value rows: 1.054 (8/8) over none; without the value rows 0.989 (4/8) against
// with them; 2 KB 1.022 (8/8) over 1 KB; 3 KB over 2 KB 1.027 (8/8) from slot 64 but 0.997 (2/6) from slot 400,
// 4 KB 1.001. On AMD EPYC (Zen 4) this scheme (2 KB) had measured 0.974 (2 of 10) from slot 64 and 1.032 (7 of
// 8) from slot 900, within that host's round-to-round swings.
// -DRANKSERVE_ATT_PF=0: none, for A/B builds.
#ifndef RANKSERVE_ATT_PF
#define RANKSERVE_ATT_PF 2048
#endif
template <typename T>
inline void prefetch_cache_rows(const T* k, const T* v, int64_t s, int rows, int64_t n, int64_t hd) {
  if constexpr (RANKSERVE_ATT_PF > 0) {
    const char* kp = reinterpret_cast<const char*>(k + s * hd) + RANKSERVE_ATT_PF;
    const char* kend = reinterpret_cast<const char*>(k + n * hd);
    const char* vp = reinterpret_cast<const char*>(v + s * hd);
    const int64_t bytes = static_cast<int64_t>(rows) * hd * static_cast<int64_t>(sizeof(T));
    for (int64_t o = 0; o < bytes; o += 64) {
      if (kp + o < kend) prefetch_at<0>(kp + o);
      prefetch_at<0, 2 /* _MM_HINT_T1: into L2 */>(vp + o);
    }
  }
}

// One thread's share of one-token attention for NH (<= kBatch) query heads that share one kv head: over the n
// cache rows k, v [n, hd], the scaled scores' max m[h], the sum l[h] of exp(score - m[h]) and the unnormalized
// acc[h, :hd] = sum_s exp(score_s - m[h]) v[s] (flash-decoding partials; n == 0 gives m = -inf, l = 0, acc = 0).
// Each key and value row is read once for the NH heads: the keys in tiles of kRows rows against NH query rows
// (dot_tile), the values in column blocks of C vectors with NH * C accumulators in registers. sc holds NH * n.
template <typename T, int NH>
void attend_rows(const float* q, int64_t hd, const T* k, const T* v, int64_t n, float scale, float* sc, float* m,
                 float* l, float* acc) {
  using V = Isa::V;
  constexpr int L = Isa::kLanes;
  for (int h = 0; h < NH; ++h) m[h] = -INFINITY;
  for (int64_t s = 0; s < n; s += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, n - s));
    prefetch_cache_rows(k, v, s, rows, n, hd);
    float out[kBatch * kRows];
    with_tile_shape(rows, NH, [&]<int R, int NB>() { dot_tile<T, float, R, NB>(k + s * hd, hd, q, hd, hd, out); });
    for (int h = 0; h < NH; ++h)
      for (int r = 0; r < rows; ++r) {
        const float d = out[h * kRows + r] * scale;
        sc[h * n + s + r] = d;
        m[h] = std::max(m[h], d);
      }
  }
  for (int h = 0; h < NH; ++h) {  // sc <- exp(sc - m), l = its sum
    float* p = sc + h * n;
    const V mv = Isa::set1(m[h]);
    V sum = Isa::zero();
    int64_t i = 0;
    for (; i + L <= n; i += L) {
      const V e = Isa::exp(Isa::sub(Isa::load(p + i), mv));
      Isa::store(p + i, e);
      sum = Isa::add(sum, e);
    }
    float rest = 0.0f;
    if (i < n) {  // the ragged end through a buffer padded with -inf (exp gives exact zeros)
      float buf[L];
      for (int j = 0; j < L; ++j) buf[j] = i + j < n ? p[i + j] : -INFINITY;
      Isa::store(buf, Isa::exp(Isa::sub(Isa::load(buf), mv)));
      for (int j = 0; i + j < n; ++j) rest += (p[i + j] = buf[j]);
    }
    l[h] = Isa::sum(sum) + rest;
  }
  constexpr int C = L >= 16 ? 4 : 2;  // value vectors per block: NH * C accumulators + C values in registers
  int64_t j0 = 0;
  auto block = [&]<int CB>() {
    V a[NH][CB];
    for (int h = 0; h < NH; ++h)
      for (int c = 0; c < CB; ++c) a[h][c] = Isa::zero();
    for (int64_t s = 0; s < n; ++s) {
      V vv[CB];
      for (int c = 0; c < CB; ++c) vv[c] = Isa::load(v + s * hd + j0 + c * L);
      for (int h = 0; h < NH; ++h) {
        const V pv = Isa::set1(sc[h * n + s]);
        for (int c = 0; c < CB; ++c) a[h][c] = Isa::fma(pv, vv[c], a[h][c]);
      }
    }
    for (int h = 0; h < NH; ++h)
      for (int c = 0; c < CB; ++c) Isa::store(acc + h * hd + j0 + c * L, a[h][c]);
    j0 += CB * L;
  };
  while (j0 + C * L <= hd) block.template operator()<C>();
  while (j0 + L <= hd) block.template operator()<1>();
  for (; j0 < hd; ++j0)
    for (int h = 0; h < NH; ++h) {
      float a = 0.0f;
      for (int64_t s = 0; s < n; ++s) a += sc[h * n + s] * to_f32(v[s * hd + j0]);
      acc[h * hd + j0] = a;
    }
}

// act[j] = silu(g[j]) * g[F + j] for the columns n0 <= j < n1 of one row g [2F] (gate, then up), rounded to T where
// the eager F.silu(g) * u rounds. The exp is the vector one PyTorch's own SiLU kernel calls (Isa::exp).
template <typename T>
void silu_mul_run(const T* g, int64_t F, int64_t n0, int64_t n1, T* act) {
  constexpr int L = Isa::kLanes;
  for (int64_t j0 = n0; j0 < n1; j0 += L) {
    const int n = static_cast<int>(std::min<int64_t>(L, n1 - j0));
    const Isa::V gv = n == L ? Isa::load(g + j0) : Isa::load_tail(g + j0, n);
    const Isa::V sv = Isa::div(gv, Isa::add(Isa::set1(1.0f), Isa::exp(Isa::sub(Isa::zero(), gv))));
    if constexpr (std::is_same_v<T, float>) {  // the roundings are no-ops
      if (n == L) {
        Isa::store(act + j0, Isa::mul(sv, Isa::load(g + F + j0)));
        continue;
      }
    }
    float sf[L];
    Isa::store(sf, sv);
    for (int j = 0; j < n; ++j) act[j0 + j] = round_t<T>(to_f32(round_t<T>(sf[j])) * to_f32(g[F + j0 + j]));
  }
}

// silu_mul_run over the B rows of gu [B, ldg] into act [B, F], kLanes columns per item of an `omp for`.
template <typename T>
void silu_mul_rows(const T* gu, int64_t ldg, int64_t B, int64_t F, T* act) {
  constexpr int L = Isa::kLanes;
  const int64_t blocks = (F + L - 1) / L;
#pragma omp for schedule(static)
  for (int64_t i = 0; i < B * blocks; ++i) {
    const int64_t b = i / blocks, j0 = i % blocks * L;
    silu_mul_run<T>(gu + b * ldg, F, j0, std::min<int64_t>(j0 + L, F), act + b * F);
  }
}

// silu_mul_run over the rows that tiles [lo, hi) of an F-row strided layout hold (strided_tile: tile t < Q = F /
// kRows holds rows t + j Q, the partial tile Q the last F % kRows rows), for the B rows of gu [B, ldg].
template <typename T>
void silu_mul_tiles(const T* gu, int64_t ldg, int64_t B, int64_t F, int64_t lo, int64_t hi, T* act) {
  const int64_t Q = F / kRows;
  for (int64_t b = 0; b < B; ++b) {
    if (lo < Q)
      for (int j = 0; j < kRows; ++j)
        silu_mul_run<T>(gu + b * ldg, F, lo + j * Q, std::min(hi, Q) + j * Q, act + b * F);
    if (hi > Q) silu_mul_run<T>(gu + b * ldg, F, Q * kRows, F, act + b * F);
  }
}

// A layer's intermediate vectors for B activation rows; one Scratch serves every layer of a stack (sized for the
// largest), since the layers run one after another.
template <typename T>
struct Scratch {
  std::vector<T> h, qkv_out, attn, ores, x1, gu_out, act, dres, tmp, xin;
  std::vector<float> scores;            // per thread: kBatch heads' scores over at most S cache rows
  std::vector<float> part_m, part_l;    // per thread and (row, head): the partial softmax's max and sum
  std::vector<float> part_acc;          // per thread and (row, head): the unnormalized sum of value rows [hd]
};

// A layer's projection groups and the stages that run them (qkv, o, gate_up, down: first stage and lifts of each)
// over the buffers of one Scratch: built once, then run at every step while that Scratch keeps its buffers.
template <typename T>
struct LayerPlan {
  Group<T> qkv, o, gu, down;
  Stage<T> st[8];
  int silu_stage = -1;  // the paired stage (4 or 5) that writes gate and up and applies the SiLU product, or -1
};

template <typename T>
void grow(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
}

// Grows `s` to hold plan `p`'s vectors for B rows (a growth moves the buffers: plan the stages afterwards).
template <typename T>
void size_scratch(Scratch<T>& s, const LayerPlan<T>& p, int64_t B, int64_t D, int64_t H, int64_t hd) {
  grow(s.h, B * D), grow(s.ores, B * D), grow(s.x1, B * D), grow(s.dres, B * D), grow(s.xin, B * D);
  grow(s.qkv_out, B * p.qkv.total_out), grow(s.attn, B * H * hd), grow(s.gu_out, B * p.gu.total_out);
  grow(s.act, B * (p.gu.total_out / 2));
  // the groups run one after another, so they share one vector of rank-sized intermediates
  grow(s.tmp, B * std::max({p.qkv.total_rank, p.o.total_rank, p.gu.total_rank, p.down.total_rank, int64_t(1)}));
}

template <typename T>
void plan_stages(LayerPlan<T>& p, Scratch<T>& s) {
  for (Stage<T>& st : p.st) st = Stage<T>{};
  group_stages<T>(p.qkv, s.h.data(), s.qkv_out.data(), s.tmp.data(), p.st[0], p.st[1]);
  group_stages<T>(p.o, s.attn.data(), s.ores.data(), s.tmp.data(), p.st[2], p.st[3]);
  group_stages<T>(p.gu, s.h.data(), s.gu_out.data(), s.tmp.data(), p.st[4], p.st[5]);
  group_stages<T>(p.down, s.act.data(), s.dres.data(), s.tmp.data(), p.st[6], p.st[7]);
  // Where one stage writes both halves of gu_out (gate and up members both dense, or both low-rank), each thread
  // computes the same rows of the two and the SiLU product of those rows, reading only values it wrote itself:
  // no stage of its own, no barrier, no lines from the other core (a mixed pair keeps the separate stage).
  const int64_t F = p.gu.total_out / 2;
  p.silu_stage = -1;
  for (const int k : {5, 4}) {
    Stage<T>& st = p.st[k];
    if (st.empty()) continue;
    const T* y = s.gu_out.data();
    if (RANKSERVE_FUSE_SILU && st.segs.size() == 2 && st.segs[0].N == F && st.segs[1].N == F &&
        st.segs[0].y == y && st.segs[1].y == y + F)
      st.paired = true, p.silu_stage = k;
    break;
  }
}

// The layer's one parallel region: x [B, D] -> out (op) [B, D], writing k and v at `slot` of the layer's caches
// kc, vc [B, KV, S, hd]. x is xp, or with xadd the sum xp + xadd, which the first norm computes (the residual add
// the previous layer deferred). With op null this layer defers its own last add the same way: its two terms stay
// in s.x1 and s.dres for the next layer (LayerStack::decode), which saves a stage and its barrier per layer.
template <typename T>
void run_layer(const LayerPlan<T>& p, Scratch<T>& s, const T* xp, const T* xadd, T* op, const T* w_in_p,
               const T* w_post_p,
               double eps, int64_t B, int64_t D, T* kc, T* vc, int64_t S, int64_t hd, const T* cp, const T* sp,
               int64_t slot, const int64_t* valid_from, int64_t H, int64_t KV, double scale) {
  const Group<T>& qkv = p.qkv;
  const Group<T>& gu = p.gu;
  const int64_t F = gu.total_out / 2;
  const int nt = std::max(1, at::get_num_threads());
  grow(s.scores, static_cast<int64_t>(nt) * kBatch * S);
  grow(s.part_m, nt * B * H), grow(s.part_l, nt * B * H), grow(s.part_acc, nt * B * H * hd);
  T *h = s.h.data(), *qkv_out = s.qkv_out.data(), *attn = s.attn.data(), *ores = s.ores.data();
  T *x1 = s.x1.data(), *gu_out = s.gu_out.data(), *act = s.act.data(), *dres = s.dres.data();
  T* xin = xadd ? s.xin.data() : nullptr;  // x, where the first norm computes it
  const T* xr = xadd ? xin : xp;
  float *scores = s.scores.data(), *part_m = s.part_m.data(), *part_l = s.part_l.data();
  float* part_acc = s.part_acc.data();
  auto run_group = [&](int g) {  // by every thread of the team
    p.st[2 * g].run(B);
    if (!p.st[2 * g + 1].empty()) p.st[2 * g + 1].run(B);
  };
  const int64_t rep = H / KV;
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    rmsnorm_rows<T>(xp, xadd, w_in_p, static_cast<float>(eps), B, D, xin, h);
    run_group(0);
    // RoPE on q and k heads, then k and v into the cache at `slot` (one item per (row, head)).
#pragma omp for schedule(static)
    for (int64_t i = 0; i < B * (H + KV); ++i) {
      const int64_t b = i / (H + KV), head = i % (H + KV);
      T* row = qkv_out + b * qkv.total_out;
      T* v = row + head * hd;  // q heads first, then k heads
      rope_head<T>(v, cp + b * hd, sp + b * hd, hd);
      if (head >= H) {
        const int64_t g = head - H;
        const int64_t off = ((b * KV + g) * S + slot) * hd;
        std::memcpy(kc + off, v, sizeof(T) * hd);
        std::memcpy(vc + off, row + (H + KV + g) * hd, sizeof(T) * hd);
      }
    }
    // One-token attention over the valid prefix [valid_from_b, slot] only, in two stages. Partials: every thread
    // takes its contiguous share of each row's valid cache rows for every kv head, with all the query heads of
    // that kv head at once. Merge: one item per (row, head) combines the threads' partials.
    {
      const int id = omp_get_thread_num(), team = omp_get_num_threads();
      float* sc = scores + static_cast<size_t>(id) * kBatch * S;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t g = 0; g < KV; ++g) {
          const int64_t lo = std::max<int64_t>(0, std::min<int64_t>(valid_from[b], slot)), n = slot + 1 - lo;
          const int64_t s0 = lo + n * id / team, s1 = lo + n * (id + 1) / team;
          const T* kb = kc + ((b * KV + g) * S + s0) * hd;
          const T* vb = vc + ((b * KV + g) * S + s0) * hd;
          for (int64_t h0 = g * rep; h0 < (g + 1) * rep; h0 += kBatch) {
            const int nh = static_cast<int>(std::min<int64_t>(kBatch, (g + 1) * rep - h0));
            float qf[kBatch * 512];
            const T* q = qkv_out + b * qkv.total_out + h0 * hd;
            for (int64_t j = 0; j < nh * hd; ++j) qf[j] = to_f32(q[j]);
            const int64_t at = (static_cast<int64_t>(id) * B + b) * H + h0;
            with_nb<1>(nh, [&]<int, int NH>() {
              attend_rows<T, NH>(qf, hd, kb, vb, s1 - s0, static_cast<float>(scale), sc, part_m + at, part_l + at,
                                 part_acc + at * hd);
            });
          }
        }
    }
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t i = 0; i < B * H; ++i) {
      const int team = omp_get_num_threads();  // the threads that wrote partials
      float mx = -INFINITY, den = 0.0f, acc[512] = {};
      for (int t = 0; t < team; ++t) mx = std::max(mx, part_m[t * B * H + i]);
      for (int t = 0; t < team; ++t) {
        const float w = part_l[t * B * H + i] > 0.0f ? std::exp(part_m[t * B * H + i] - mx) : 0.0f;
        den += w * part_l[t * B * H + i];
        if (w > 0.0f) axpy_f32<float>(w, part_acc + (t * B * H + i) * hd, acc, hd);
      }
      T* dst = attn + i * hd;  // attn [B, H, hd]
      for (int64_t j = 0; j < hd; ++j) dst[j] = round_t<T>(acc[j] / den);
    }
    run_group(1);
    rmsnorm_rows<T>(xr, ores, w_post_p, static_cast<float>(eps), B, D, x1, h);
    if (p.silu_stage < 0) {
      run_group(2);
      silu_mul_rows<T>(gu_out, gu.total_out, B, F, act);
    } else {
      auto silu = [&](int64_t lo, int64_t hi) { silu_mul_tiles<T>(gu_out, gu.total_out, B, F, lo, hi, act); };
      if (p.silu_stage == 5) p.st[4].run(B);
      p.st[p.silu_stage].run(B, silu);
    }
    run_group(3);
    if (op != nullptr) {
#pragma omp for schedule(static)
      for (int64_t i = 0; i < B * D; ++i) op[i] = round_t<T>(to_f32(x1[i]) + to_f32(dres[i]));
    }
  }
}

template <typename T>
at::Tensor decode_layer_impl(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& w_post, double eps,
                             LayerPlan<T>& plan, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& cos,
                             const at::Tensor& sin, int64_t slot, const int64_t* valid_from, int64_t H, int64_t KV,
                             double scale) {
  const int64_t B = x.size(0), D = x.size(1), S = k_cache.size(2), hd = k_cache.size(3);
  Scratch<T> s;
  size_scratch(s, plan, B, D, H, hd);
  plan_stages(plan, s);
  at::Tensor out = at::empty(x.sizes(), x.options());
  run_layer<T>(plan, s, data_of<T>(x), nullptr, mutable_data_of<T>(out), data_of<T>(w_in), data_of<T>(w_post), eps,
               B, D, mutable_data_of<T>(k_cache), mutable_data_of<T>(v_cache), S, hd, data_of<T>(cos),
               data_of<T>(sin), slot, valid_from, H, KV, scale);
  return out;
}

// What a decode step's inputs (shared by all its layers) say, once checked: x [B, D], one layer's caches
// k_cache, v_cache [B, KV, S, hd], cos and sin [B, hd], slot (one CPU int64) and valid_from int64 [B].
struct StepInfo {
  int64_t B, D, S, hd, slot;
  const int64_t* valid_from;
};

StepInfo check_step(const at::Tensor& x, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cos,
                    const at::Tensor& sin, const at::Tensor& slot, const at::Tensor& valid_from, int64_t n_heads,
                    int64_t n_kv) {
  const auto dtype = check_x("decode_layer", x);
  check_operand("decode_layer", "k_cache", k_cache, dtype, 4);
  check_operand("decode_layer", "v_cache", v_cache, dtype, 4);
  check_operand("decode_layer", "cos", cos, dtype, 2);
  check_operand("decode_layer", "sin", sin, dtype, 2);
  const int64_t B = x.size(0), D = x.size(1), hd = k_cache.size(3), S = k_cache.size(2);
  TORCH_CHECK(k_cache.size(0) == B && k_cache.size(1) == n_kv, "rankserve::decode_layer: k_cache is ",
              k_cache.sizes(), " for batch ", B, " and ", n_kv, " kv heads");
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "rankserve::decode_layer: v_cache ", v_cache.sizes(),
              " differs from k_cache ", k_cache.sizes());
  TORCH_CHECK(hd <= 512 && hd % 2 == 0, "rankserve::decode_layer: head dim ", hd, " must be even and <= 512");
  TORCH_CHECK(n_kv > 0 && n_heads % n_kv == 0, "rankserve::decode_layer: ", n_heads, " heads over ", n_kv,
              " kv heads");
  TORCH_CHECK(cos.size(0) == B && cos.size(1) == hd, "rankserve::decode_layer: cos is ", cos.sizes());
  TORCH_CHECK(sin.sizes() == cos.sizes(), "rankserve::decode_layer: sin is ", sin.sizes(), ", cos ", cos.sizes());
  TORCH_CHECK(slot.scalar_type() == at::kLong && slot.numel() == 1 && slot.device().is_cpu(),
              "rankserve::decode_layer: slot must be one int64 on the CPU");
  TORCH_CHECK(valid_from.scalar_type() == at::kLong && valid_from.numel() == B && valid_from.is_contiguous(),
              "rankserve::decode_layer: valid_from must be int64 [B]");
  const int64_t s = *slot.const_data_ptr<int64_t>();  // a CPU int64 (checked above); item() is a dispatcher call
  TORCH_CHECK(s >= 0 && s < S, "rankserve::decode_layer: slot ", s, " outside the cache of ", S, " slots");
  return {B, D, S, hd, s, valid_from.const_data_ptr<int64_t>()};
}

using OptT = std::optional<at::Tensor>;

// One packed projection group as the ops take it (see make_group).
struct GroupArgs {
  at::Tensor first;
  OptT first_scale, bias;
  std::vector<at::Tensor> lifts, lift_scales;
  std::vector<int64_t> splits;
};

// A layer's plan (its groups; stages are planned over a Scratch later), with the checks of its sizes against the
// hidden size D and the head layout.
template <typename T>
LayerPlan<T> make_plan(const GroupArgs (&g)[4], int64_t D, int64_t hd, int64_t n_heads, int64_t n_kv,
                       at::ScalarType dtype) {
  static const char* names[4] = {"qkv", "o", "gate_up", "down"};
  LayerPlan<T> p;
  Group<T>* out[4] = {&p.qkv, &p.o, &p.gu, &p.down};
  for (int i = 0; i < 4; ++i)
    *out[i] = make_group<T>(g[i].first, g[i].first_scale, g[i].lifts, g[i].lift_scales, g[i].splits, g[i].bias,
                            names[i], dtype);
  TORCH_CHECK(p.qkv.K == D && p.gu.K == D && p.o.total_out == D && p.down.total_out == D,
              "rankserve::decode_layer: projection sizes do not match hidden size ", D);
  TORCH_CHECK(p.qkv.total_out == (n_heads + 2 * n_kv) * hd && p.o.K == n_heads * hd &&
                  p.down.K * 2 == p.gu.total_out,
              "rankserve::decode_layer: projection sizes do not match the head layout");
  return p;
}

at::Tensor decode_layer(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& w_post, double eps,
                        const at::Tensor& qkv_first, const OptT& qkv_first_scale, at::TensorList qkv_lifts,
                        at::TensorList qkv_lift_scales, c10::IntArrayRef qkv_splits, const OptT& qkv_bias,
                        const at::Tensor& o_first, const OptT& o_first_scale, at::TensorList o_lifts,
                        at::TensorList o_lift_scales, c10::IntArrayRef o_splits, const OptT& o_bias,
                        const at::Tensor& gu_first, const OptT& gu_first_scale, at::TensorList gu_lifts,
                        at::TensorList gu_lift_scales, c10::IntArrayRef gu_splits, const OptT& gu_bias,
                        const at::Tensor& down_first, const OptT& down_first_scale, at::TensorList down_lifts,
                        at::TensorList down_lift_scales, c10::IntArrayRef down_splits, const OptT& down_bias, at::Tensor& k_cache, at::Tensor& v_cache,
                        const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& slot,
                        const at::Tensor& valid_from, int64_t n_heads, int64_t n_kv, double scale) {
  const auto dtype = check_x("decode_layer", x);
  check_operand("decode_layer", "w_in", w_in, dtype, 1);
  check_operand("decode_layer", "w_post", w_post, dtype, 1);
  const StepInfo st = check_step(x, k_cache, v_cache, cos, sin, slot, valid_from, n_heads, n_kv);
  const int64_t B = st.B, D = st.D, hd = st.hd, s = st.slot;
  const int64_t* vf = st.valid_from;
  const GroupArgs g[4] = {
      {qkv_first, qkv_first_scale, qkv_bias, qkv_lifts.vec(), qkv_lift_scales.vec(), qkv_splits.vec()},
      {o_first, o_first_scale, o_bias, o_lifts.vec(), o_lift_scales.vec(), o_splits.vec()},
      {gu_first, gu_first_scale, gu_bias, gu_lifts.vec(), gu_lift_scales.vec(), gu_splits.vec()},
      {down_first, down_first_scale, down_bias, down_lifts.vec(), down_lift_scales.vec(), down_splits.vec()}};
  auto run = [&](auto tag) -> at::Tensor {
    using T = decltype(tag);
    LayerPlan<T> plan = make_plan<T>(g, D, hd, n_heads, n_kv, dtype);
    return decode_layer_impl<T>(x, w_in, w_post, eps, plan, k_cache, v_cache, cos, sin, s, vf, n_heads, n_kv, scale);
  };
  return dtype == at::kFloat ? run(float{}) : run(bf16{});
}

// Every decoder layer of a model, held on the C++ side, so that a decode step is one call from Python instead of
// one per layer: with its 37 arguments (lists of lifts among them) a decode_layer call costs 25-40 us of argument
// conversion and dispatch before its parallel region starts, ~1 ms per SmolLM2 token. It also keeps each layer's
// plan (groups and stages) and one Scratch between steps, rebuilt only when the dtype or batch changes, so a
// layer no longer checks its weights, allocates its vectors and plans its stages at every step. Not for
// concurrent steps (neither is the KV cache). Built once per runner from the same tensors the per-layer op takes,
// flattened (rankserve/runtime/fast.py, FastDecoder._layer_stack):
//   tensors, per layer: w_in, w_post, then per group (qkv, o, gate_up, down): first, first_scale, lifts...,
//     lift_scales..., bias; an absent scale or bias is an empty tensor.
//   layout, per layer and group: members, splits (one per member), number of lifts, number of lift scales.
struct LayerStack : torch::CustomClassHolder {
  struct LayerArgs {
    at::Tensor w_in, w_post;
    double eps;
    GroupArgs g[4];
  };
  std::vector<LayerArgs> layers;
  int64_t n_heads, n_kv;
  double scale;
  // the plans of the last step's dtype and batch, over one scratch
  at::ScalarType plan_dtype = at::ScalarType::Undefined;
  int64_t plan_B = -1;
  std::vector<LayerPlan<float>> plans_f;
  std::vector<LayerPlan<bf16>> plans_b;
  Scratch<float> scratch_f;
  Scratch<bf16> scratch_b;
  struct Ends {
    at::Tensor embed, cos, sin, w_norm;
    double eps;
    GroupArgs head;
  };
  std::optional<Ends> ends;
  // the head's group and buffers, planned for head_dtype
  template <typename T>
  struct Head {
    Group<T> g;
    std::vector<T> normed, tmp;
  };
  at::ScalarType head_dtype = at::ScalarType::Undefined;
  Head<float> head_f;
  Head<bf16> head_b;
  template <typename T>
  Head<T>& head_state() {
    if constexpr (std::is_same_v<T, float>)
      return head_f;
    else
      return head_b;
  }

  LayerStack(std::vector<at::Tensor> tensors, std::vector<int64_t> layout, std::vector<double> eps, int64_t n_heads,
             int64_t n_kv, double scale)
      : n_heads(n_heads), n_kv(n_kv), scale(scale) {
    size_t ti = 0, li = 0;
    auto tensor = [&]() {
      TORCH_CHECK(ti < tensors.size(), "rankserve::LayerStack: the layout asks for more than the ", tensors.size(),
                  " tensors given");
      return tensors[ti++];
    };
    auto count = [&]() {
      TORCH_CHECK(li < layout.size() && layout[li] >= 0, "rankserve::LayerStack: layout too short or negative");
      return layout[li++];
    };
    for (const double e : eps) {
      LayerArgs L;
      L.eps = e;
      L.w_in = tensor();
      L.w_post = tensor();
      for (GroupArgs& g : L.g) g = read_group(tensor, count);
      layers.push_back(std::move(L));
    }
    TORCH_CHECK(ti == tensors.size() && li == layout.size(), "rankserve::LayerStack: ", tensors.size() - ti,
                " tensors and ", layout.size() - li, " layout entries left over after ", eps.size(), " layers");
  }

  // One group from the flat lists: first, its scale, bias and lifts from `tensor`, the counts from `count`.
  template <typename Tensor, typename Count>
  static GroupArgs read_group(Tensor&& tensor, Count&& count) {
    auto optional = [](const at::Tensor& t) { return t.numel() == 0 ? OptT{} : OptT{t}; };
    GroupArgs g;
    g.first = tensor();
    g.first_scale = optional(tensor());
    for (int64_t m = count(); m > 0; --m) g.splits.push_back(count());
    const int64_t n_lifts = count(), n_scales = count();
    for (int64_t i = 0; i < n_lifts; ++i) g.lifts.push_back(tensor());
    for (int64_t i = 0; i < n_scales; ++i) g.lift_scales.push_back(tensor());
    g.bias = optional(tensor());
    return g;
  }

  // The ends of a decode step, for step(): the embedding table [V, D], the RoPE tables cos, sin [positions, hd],
  // the final norm's weight and eps, and the LM head as one group (tensors and layout as the constructor reads
  // a group's).
  void set_ends(std::vector<at::Tensor> tensors, std::vector<int64_t> layout, double eps) {
    TORCH_CHECK(tensors.size() >= 5, "rankserve::LayerStack::set_ends: embed, cos, sin, norm and a head group");
    size_t ti = 4, li = 0;
    auto tensor = [&]() {
      TORCH_CHECK(ti < tensors.size(), "rankserve::LayerStack::set_ends: the layout asks for more tensors");
      return tensors[ti++];
    };
    auto count = [&]() {
      TORCH_CHECK(li < layout.size() && layout[li] >= 0, "rankserve::LayerStack::set_ends: layout too short");
      return layout[li++];
    };
    Ends e{tensors[0], tensors[1], tensors[2], tensors[3], eps, read_group(tensor, count)};
    TORCH_CHECK(ti == tensors.size() && li == layout.size(), "rankserve::LayerStack::set_ends: ", tensors.size() - ti,
                " tensors and ", layout.size() - li, " layout entries left over");
    TORCH_CHECK(e.embed.dim() == 2 && e.embed.is_contiguous() && e.cos.dim() == 2 && e.cos.is_contiguous() &&
                    e.sin.sizes() == e.cos.sizes() && e.sin.is_contiguous(),
                "rankserve::LayerStack::set_ends: embed must be [V, D] and cos, sin [positions, hd], contiguous");
    ends = std::move(e);
    head_dtype = at::ScalarType::Undefined;  // replan the head
  }

  // One whole decode step: tokens [B] at positions [B] (int64) -> logits [B, V], the embedding lookup, every
  // layer, the final norm and the head in native code: the dozen small PyTorch ops these ends took between two
  // steps cost ~270 us per step on an Intel Xeon (each runs with caches the layers have just flushed), 6% of an
  // int8 SVD-LLM 0.4 step.
  at::Tensor step(at::Tensor tokens, at::Tensor positions, at::Tensor k_cache, at::Tensor v_cache, at::Tensor slot,
                  at::Tensor valid_from) {
    TORCH_CHECK(ends.has_value(), "rankserve::LayerStack::step: set_ends was not called");
    const Ends& e = *ends;
    TORCH_CHECK(tokens.scalar_type() == at::kLong && tokens.dim() == 1 && positions.scalar_type() == at::kLong &&
                    positions.sizes() == tokens.sizes() && tokens.device().is_cpu() && positions.device().is_cpu(),
                "rankserve::LayerStack::step: tokens and positions must be int64 [B] on the CPU, got ",
                tokens.scalar_type(), " ", tokens.sizes(), " and ", positions.scalar_type(), " ", positions.sizes());
    tokens = tokens.contiguous(), positions = positions.contiguous();
    const int64_t B = tokens.size(0), V = e.embed.size(0), D = e.embed.size(1), hd = e.cos.size(1);
    const int64_t P = e.cos.size(0);
    at::Tensor x = at::empty({B, D}, e.embed.options());
    at::Tensor cos = at::empty({B, hd}, e.cos.options()), sin = at::empty({B, hd}, e.cos.options());
    const size_t es = e.embed.element_size();
    for (int64_t b = 0; b < B; ++b) {
      const int64_t t = tokens.const_data_ptr<int64_t>()[b], pos = positions.const_data_ptr<int64_t>()[b];
      TORCH_CHECK(t >= 0 && t < V, "rankserve::LayerStack::step: token ", t, " outside the vocabulary of ", V);
      TORCH_CHECK(pos >= 0 && pos < P, "rankserve::LayerStack::step: position ", pos, " outside the RoPE table of ",
                  P);
      std::memcpy(static_cast<char*>(x.data_ptr()) + b * D * es,
                  static_cast<const char*>(e.embed.const_data_ptr()) + t * D * es, D * es);
      std::memcpy(static_cast<char*>(cos.data_ptr()) + b * hd * es,
                  static_cast<const char*>(e.cos.const_data_ptr()) + pos * hd * es, hd * es);
      std::memcpy(static_cast<char*>(sin.data_ptr()) + b * hd * es,
                  static_cast<const char*>(e.sin.const_data_ptr()) + pos * hd * es, hd * es);
    }
    at::Tensor h = decode(x, k_cache, v_cache, cos, sin, slot, valid_from);
    auto run = [&](auto tag) -> at::Tensor {
      using T = decltype(tag);
      const auto dtype = h.scalar_type();
      check_operand("LayerStack::step", "norm", e.w_norm, dtype, 1);
      TORCH_CHECK(e.w_norm.size(0) == D, "rankserve::LayerStack::step: the final norm has ", e.w_norm.size(0),
                  " weights for hidden size ", D);
      auto& head = head_state<T>();
      if (head_dtype != dtype) {
        head_dtype = at::ScalarType::Undefined;
        head.g = make_group<T>(e.head.first, e.head.first_scale, e.head.lifts, e.head.lift_scales, e.head.splits,
                               e.head.bias, "lm_head", dtype);
        TORCH_CHECK(head.g.K == D, "rankserve::LayerStack::step: the head takes ", head.g.K, " inputs, not ", D);
        head_dtype = dtype;
      }
      grow(head.normed, B * D), grow(head.tmp, B * std::max<int64_t>(head.g.total_rank, 1));
      at::Tensor out = at::empty({B, head.g.total_out}, h.options());
      Stage<T> first, lifts;  // rebuilt per step: they point into this step's output
      group_stages<T>(head.g, head.normed.data(), mutable_data_of<T>(out), head.tmp.data(), first, lifts);
      const T* hp = data_of<T>(h);
      const T* wp = data_of<T>(e.w_norm);
      T* np = head.normed.data();
      const int nt = std::max(1, at::get_num_threads());
      // a profiler sees the head as the op it would otherwise be called as
      RECORD_FUNCTION(head.g.qfirst.q ? RANKSERVE_OPS_NAME "::int8_gemv" : RANKSERVE_OPS_NAME "::gemv",
                      std::vector<c10::IValue>());
#pragma omp parallel num_threads(nt) if (nt > 1)
      {
        rmsnorm_rows<T>(hp, nullptr, wp, static_cast<float>(e.eps), B, D, nullptr, np);
        first.run(B);
        if (!lifts.empty()) lifts.run(B);
      }
      return out;
    };
    return h.scalar_type() == at::kFloat ? run(float{}) : run(bf16{});
  }

  template <typename T>
  std::pair<std::vector<LayerPlan<T>>*, Scratch<T>*> state() {
    if constexpr (std::is_same_v<T, float>)
      return {&plans_f, &scratch_f};
    else
      return {&plans_b, &scratch_b};
  }

  // x [B, D] through every layer; k_cache, v_cache [layers, B, KV, S, hd]; the rest as decode_layer takes them.
  at::Tensor decode(at::Tensor x, at::Tensor k_cache, at::Tensor v_cache, at::Tensor cos, at::Tensor sin,
                    at::Tensor slot, at::Tensor valid_from) {
    const int64_t n = static_cast<int64_t>(layers.size());
    TORCH_CHECK(n > 0, "rankserve::LayerStack: no layers");
    TORCH_CHECK(k_cache.dim() == 5 && k_cache.size(0) == n && v_cache.dim() == 5 && v_cache.size(0) == n &&
                    k_cache.is_contiguous() && v_cache.is_contiguous(),
                "rankserve::LayerStack: caches must be contiguous [", n, " layers, B, KV, S, hd], got ",
                k_cache.sizes(), " and ", v_cache.sizes());
    const StepInfo st = check_step(x, k_cache[0], v_cache[0], cos, sin, slot, valid_from, n_heads, n_kv);
    const auto dtype = x.scalar_type();
    auto run = [&](auto tag) -> at::Tensor {
      using T = decltype(tag);
      auto [plans, scratch] = state<T>();
      if (plan_dtype != dtype || plan_B != st.B) {
        plan_dtype = at::ScalarType::Undefined;  // until the plans below are complete
        plans->clear();
        for (const LayerArgs& L : layers) {
          check_operand("decode_layer", "w_in", L.w_in, dtype, 1);
          check_operand("decode_layer", "w_post", L.w_post, dtype, 1);
          plans->push_back(make_plan<T>(L.g, st.D, st.hd, n_heads, n_kv, dtype));
        }
        for (const LayerPlan<T>& p : *plans) size_scratch(*scratch, p, st.B, st.D, n_heads, st.hd);
        for (LayerPlan<T>& p : *plans) plan_stages(p, *scratch);  // the scratch no longer moves
        plan_dtype = dtype, plan_B = st.B;
      }
      at::Tensor buf[2] = {at::empty(x.sizes(), x.options()), at::empty(x.sizes(), x.options())};
      const T* in = data_of<T>(x);
      const T* add = nullptr;
      T* kc = mutable_data_of<T>(k_cache);
      T* vc = mutable_data_of<T>(v_cache);
      const int64_t layer_elems = k_cache.stride(0);
      for (int64_t i = 0; i < n; ++i) {
        // a profiler sees each layer as the op it would otherwise be called as
        RECORD_FUNCTION(RANKSERVE_OPS_NAME "::decode_layer", std::vector<c10::IValue>());
        const LayerArgs& L = layers[i];
        // every layer but the last leaves its residual add to the next one's first norm (run_layer)
        const bool defer = RANKSERVE_FOLD_RESIDUAL && i + 1 < n;
        T* out = defer ? nullptr : mutable_data_of<T>(buf[i % 2]);
        run_layer<T>((*plans)[i], *scratch, in, add, out, data_of<T>(L.w_in), data_of<T>(L.w_post), L.eps, st.B, st.D,
                     kc + i * layer_elems, vc + i * layer_elems, st.S, st.hd, data_of<T>(cos), data_of<T>(sin),
                     st.slot, st.valid_from, n_heads, n_kv, scale);
        in = defer ? scratch->x1.data() : out;
        add = defer ? scratch->dres.data() : nullptr;
      }
      return buf[(n - 1) % 2];
    };
    return dtype == at::kFloat ? run(float{}) : run(bf16{});
  }
};
