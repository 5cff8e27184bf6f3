// Linear layers for a few rows (a single stream's decode, a small batch): out = x W^T (+ bias), with W given as
// the segments the layer fuses (q | k | v, gate | up), each [rows_i, K] row-major, read in place.
//
// With one to four rows of x, a linear is a pass over its weights: each weight is used once per row of x, so the
// time is the time to stream the weights from memory. oneDNN's GEMM reads them at about half this machine's
// bandwidth there. Here each thread walks its own contiguous run of weight rows, one row at a time (a single
// sequential stream, which the hardware prefetcher follows), with several independent sums per row so that no
// chain of dependent FMAs holds the loads back. Accumulates in float; float64 stays with torch.
#include <cstdint>
#include <vector>

#include "numeric.h"
#include "simd.h"

namespace {

using remp::bf16;
using remp::widen;

constexpr int64_t kParallelWork = 1 << 15;  // weights below which threads cost more than they save

// independent sums per (row of x, weight row): M x U accumulators, within the 16 vector registers
template <int M> constexpr int kUnroll = M <= 2 ? 4 : M == 3 ? 3 : 2;

// out[m] = x[m] . w for M rows of x (float, K each) and one weight row
template <typename T, int M>
inline void dots(const float* x, int64_t K, const T* w, float out[M]) {
  int64_t k = 0;
#if REMP_SIMD8
  constexpr int U = kUnroll<M>;
  __m256 acc[U][M];
  for (int u = 0; u < U; ++u)
    for (int m = 0; m < M; ++m) acc[u][m] = _mm256_setzero_ps();
  auto step = [&](int u, int64_t at) {
    const __m256 wv = remp::load8(w + at);
    for (int m = 0; m < M; ++m) acc[u][m] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + at), wv, acc[u][m]);
  };
  for (; k + 8 * U <= K; k += 8 * U)
    for (int u = 0; u < U; ++u) step(u, k + 8 * u);
  for (; k + 8 <= K; k += 8) step(0, k);
  for (int m = 0; m < M; ++m) {
    __m256 total = acc[0][m];
    for (int u = 1; u < U; ++u) total = _mm256_add_ps(total, acc[u][m]);
    out[m] = remp::sum8(total);
  }
#else
  for (int m = 0; m < M; ++m) out[m] = 0.0f;
#endif
  for (; k < K; ++k) {
    const float wk = widen(w[k]);
    for (int m = 0; m < M; ++m) out[m] += x[m * K + k] * wk;
  }
}

template <typename T, int M>
void small_linear(const T* x, int64_t x_stride, int64_t K, const T* const* segs, const int64_t* seg_rows,
                  int64_t nseg, const T* bias, T* out, int64_t out_stride) {
  std::vector<float> xf(M * K);
  for (int m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xf[m * K + k] = widen(x[m * x_stride + k]);
  std::vector<int64_t> first(nseg + 1, 0);  // output column of each segment's first row
  for (int64_t s = 0; s < nseg; ++s) first[s + 1] = first[s] + seg_rows[s];
  const int64_t N = first[nseg];
#pragma omp parallel for schedule(static) if (N * K > kParallelWork)
  for (int64_t n = 0; n < N; ++n) {
    int64_t s = 0;
    while (n >= first[s + 1]) ++s;
    float y[M];
    dots<T, M>(xf.data(), K, segs[s] + (n - first[s]) * K, y);
    for (int m = 0; m < M; ++m) out[m * out_stride + n] = remp::narrow(bias ? y[m] + widen(bias[n]) : y[m], out);
  }
}

}  // namespace

// 0, or -1 for a number of rows it does not take (1 to 4)
#define REMP_SMALL_LINEAR(SUFFIX, T)                                                                             \
  extern "C" int remp_small_linear_##SUFFIX(const void* x, int64_t rows, int64_t x_stride, int64_t K,            \
                                            const void* const* segs, const int64_t* seg_rows, int64_t nseg,      \
                                            const void* bias, void* out, int64_t out_stride) {                   \
    auto run = rows == 1   ? small_linear<T, 1>                                                                  \
               : rows == 2 ? small_linear<T, 2>                                                                  \
               : rows == 3 ? small_linear<T, 3>                                                                  \
               : rows == 4 ? small_linear<T, 4>                                                                  \
                           : nullptr;                                                                            \
    if (!run) return -1;                                                                                         \
    run(static_cast<const T*>(x), x_stride, K, reinterpret_cast<const T* const*>(segs), seg_rows, nseg,          \
        static_cast<const T*>(bias), static_cast<T*>(out), out_stride);                                          \
    return 0;                                                                                                    \
  }

REMP_SMALL_LINEAR(f32, float)
REMP_SMALL_LINEAR(bf16, bf16)
