// A streaming-read kernel: the memory read bandwidth the GEMV kernels can hope for, measured the way they read.
//
// Included by kernels.cpp inside its anonymous namespace (it uses Isa and team_size). The bench divides the
// bytes a decode step streams by this kernel's rate, so it must read at least as fast as the GEMV does: all
// threads, full-width loads, and per thread kStreams address-ordered streams, as matvec_rows walks the row tiles
// of a matrix (see matvec_tile). PyTorch's x.sum() read slower than the GEMV streamed, so "achieved / probe"
// exceeded 1. The sum of the elements is returned so the compiler cannot drop a single load.

constexpr int kStreams = kRows;  // streams per thread, as many as a GEMV row tile has rows

// Sum of x[0:n] with fp32 vector accumulators: kStreams equal parts read side by side, two vectors each.
inline double stream_sum(const float* x, int64_t n) {
  using V = Isa::V;
  constexpr int L = Isa::kLanes;
  const int64_t part = n / kStreams / (2 * L) * (2 * L);  // whole double-vectors per stream
  V acc[kStreams][2];
  for (int s = 0; s < kStreams; ++s) acc[s][0] = acc[s][1] = Isa::zero();
  for (int64_t i = 0; i < part; i += 2 * L)
    for (int s = 0; s < kStreams; ++s) {
      const float* p = x + s * part + i;
      acc[s][0] = Isa::fma(Isa::load(p), Isa::set1(1.0f), acc[s][0]);
      acc[s][1] = Isa::fma(Isa::load(p + L), Isa::set1(1.0f), acc[s][1]);
    }
  double total = 0.0;
  for (int s = 0; s < kStreams; ++s) total += static_cast<double>(Isa::sum(acc[s][0])) + Isa::sum(acc[s][1]);
  for (int64_t i = kStreams * part; i < n; ++i) total += x[i];  // the ragged end
  return total;
}

// The sum of a contiguous fp32 tensor, read once by every thread of the team, each its own contiguous slice.
double stream_read(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              "rankserve::stream_read: takes a contiguous float32 CPU tensor, got ", t.scalar_type(), " ",
              t.sizes(), " on ", t.device());
  const float* x = t.const_data_ptr<float>();
  const int64_t n = t.numel();
  const int nt = team_size(n * static_cast<int64_t>(sizeof(float)));
  std::vector<double> parts(static_cast<size_t>(nt), 0.0);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int id = omp_get_thread_num(), team = omp_get_num_threads();
    const int64_t per = (n + team - 1) / team / 16 * 16 + 16;  // slices start on 64-byte boundaries of x
    const int64_t lo = std::min<int64_t>(n, id * per), hi = std::min<int64_t>(n, lo + per);
    parts[id] = stream_sum(x + lo, hi - lo);
  }
  double total = 0.0;
  for (double p : parts) total += p;
  return total;
}
