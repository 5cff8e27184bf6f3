// Attention of query rows over the paged KV cache, read in place through the block tables: no gathered copy of
// K/V, and one pass per (sequence, KV head) that serves all the q heads of its GQA group.
//
// Built on the machine that runs it (-march=native), so it uses whatever vector units that CPU has (float32 and
// bf16 caches with a head size of 64 or 128 take a path written in AVX2 intrinsics where the CPU has them); loaded with
// ctypes (no torch headers: it compiles in about a second). OpenMP comes from the libgomp torch has already
// loaded, so it shares torch's thread pool.
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "numeric.h"
#include "simd.h"

namespace {

using remp::bf16;
using remp::exp_approx;
using remp::widen;

constexpr int64_t kRowTile = 16;  // query rows scored together: each key row is read once per tile

// Row r of a sequence's rows is r = i * group + g: its query token i, q head g of the GQA group. Its vector of D in
// q or out, whose rows (tokens) lie row_stride apart and start at `start` for this sequence.
template <typename T>
inline T* head_row(T* base, int64_t row_stride, int64_t start, int64_t r, int64_t group, int64_t head, int64_t D) {
  return base + (start + r / group) * row_stride + (head * group + r % group) * D;
}

// kD: the head size when known at compile time (the common ones: fully unrolled loops), 0 for any other
template <typename T, typename Acc, int kD>
void attend_one(const T* q, int64_t q_row_stride, const T* k_head, const T* v_head, T* out, int64_t out_row_stride,
                int64_t start, int64_t qlen, int64_t ctx, const int64_t* table, int64_t group, int64_t head,
                int64_t D_, int64_t bs, Acc scale, std::vector<Acc>& scores, std::vector<Acc>& qbuf,
                std::vector<Acc>& acc) {
  const int64_t D = kD ? kD : D_;
  const int64_t rows = qlen * group;
  for (int64_t r0 = 0; r0 < rows; r0 += kRowTile) {
    const int64_t nr = rows < r0 + kRowTile ? rows - r0 : kRowTile;
    int64_t nkeys = 0;
    for (int64_t r = 0; r < nr; ++r) {  // query token (r0 + r) / group sees keys 0..its position
      const T* src = head_row(q, q_row_stride, start, r0 + r, group, head, D);
      for (int64_t d = 0; d < D; ++d) qbuf[r * D + d] = widen(src[d]) * scale;
      const int64_t seen = ctx - qlen + (r0 + r) / group + 1;
      if (seen > nkeys) nkeys = seen;
    }
    for (int64_t j = 0; j < nkeys; ++j) {
      const T* kr = k_head + (table[j / bs] * bs + j % bs) * D;
      for (int64_t r = 0; r < nr; ++r) {
        const Acc* qr = &qbuf[r * D];
        Acc s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t d = 0; d < D; ++d) s += qr[d] * widen(kr[d]);
        scores[r * nkeys + j] = s;
      }
    }
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t seen = ctx - qlen + (r0 + r) / group + 1;
      Acc* sr = &scores[r * nkeys];
      Acc m = sr[0];
      for (int64_t j = 1; j < seen; ++j) m = sr[j] > m ? sr[j] : m;
      Acc sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < seen; ++j) {
        sr[j] = exp_approx(sr[j] - m);
        sum += sr[j];
      }
      const Acc inv = Acc(1) / sum;
      for (int64_t j = 0; j < seen; ++j) sr[j] *= inv;
      for (int64_t j = seen; j < nkeys; ++j) sr[j] = 0;
      std::fill(&acc[r * D], &acc[r * D] + D, Acc(0));
    }
    for (int64_t j = 0; j < nkeys; ++j) {
      const T* vr = v_head + (table[j / bs] * bs + j % bs) * D;
      for (int64_t r = 0; r < nr; ++r) {
        const Acc p = scores[r * nkeys + j];
        Acc* ar = &acc[r * D];
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) ar[d] += p * widen(vr[d]);
      }
    }
    for (int64_t r = 0; r < nr; ++r) {
      T* dst = head_row(out, out_row_stride, start, r0 + r, group, head, D);
      for (int64_t d = 0; d < D; ++d) dst[d] = remp::narrow(acc[r * D + d], dst);
    }
  }
}

#if REMP_SIMD8
constexpr int64_t kKeyTile = 32;  // keys whose values one row's accumulators take in before the next row's
constexpr int64_t kPrefetch = 24;  // keys ahead of the scores that are being computed

// attend_one in 8-lane vectors, for float and bf16 caches with a head size of 64 or 128: scores eight keys at a
// time (one horizontal sum for eight dot products, not one each), walks the block table once per sequence, and
// keeps a row's output in registers while it takes in a tile of values.
template <typename T, int kD>
void attend_one_vec(const T* q, int64_t q_row_stride, const T* k_head, const T* v_head, T* out,
                    int64_t out_row_stride, int64_t start, int64_t qlen, int64_t ctx, const int64_t* table,
                    int64_t group, int64_t head, int64_t bs, float scale, std::vector<float>& scores,
                    std::vector<float>& qbuf, std::vector<float>& acc, std::vector<int64_t>& keyoff) {
  constexpr int kChunks = kD / 8;
  for (int64_t j = 0, blk = 0, off = 0; j < ctx; ++j) {  // key j's row in a head's cache, without a division
    keyoff[j] = (table[blk] * bs + off) * kD;
    if (++off == bs) off = 0, ++blk;
  }
  for (int64_t j = 0; j < kPrefetch && j < ctx; ++j) remp::prefetch_row<kD * sizeof(T)>(k_head + keyoff[j]);
  const int64_t rows = qlen * group;
  int64_t seen[kRowTile];
  float norm[kRowTile];
  for (int64_t r0 = 0; r0 < rows; r0 += kRowTile) {
    const int64_t nr = rows < r0 + kRowTile ? rows - r0 : kRowTile;
    for (int64_t r = 0; r < nr; ++r) {  // query token (r0 + r) / group sees keys 0..its position
      const T* src = head_row(q, q_row_stride, start, r0 + r, group, head, kD);
      for (int64_t d = 0; d < kD; ++d) qbuf[r * kD + d] = widen(src[d]) * scale;
      seen[r] = ctx - qlen + (r0 + r) / group + 1;
    }
    const int64_t nkeys = seen[nr - 1];  // rows go by position: the last sees the most
    const int64_t stride = (nkeys + 7) / 8 * 8;  // a row's scores, whole groups of eight
    for (int64_t j0 = 0; j0 < nkeys; j0 += 8) {
      const T* kr[8];
      for (int k = 0; k < 8; ++k) kr[k] = k_head + keyoff[j0 + k < nkeys ? j0 + k : nkeys - 1];
      // blocks lie anywhere in the pool, so the hardware prefetcher cannot see the next one coming: ask (into L2)
      // for the keys kPrefetch ahead, and for these keys' values, which the p.v loop reads once the scores are done
      for (int64_t k = 0; k < 8 && j0 + kPrefetch + k < nkeys; ++k)
        remp::prefetch_row<kD * sizeof(T)>(k_head + keyoff[j0 + kPrefetch + k]);
      for (int64_t k = 0; k < 8 && j0 + k < nkeys; ++k) remp::prefetch_row<kD * sizeof(T)>(v_head + keyoff[j0 + k]);
      for (int64_t r = 0; r < nr; ++r) {
        if (seen[r] <= j0) continue;
        __m256 s[8];
        for (int k = 0; k < 8; ++k) s[k] = _mm256_setzero_ps();
        for (int c = 0; c < kChunks; ++c) {
          const __m256 qc = _mm256_loadu_ps(&qbuf[r * kD + 8 * c]);
          for (int k = 0; k < 8; ++k) s[k] = _mm256_fmadd_ps(qc, remp::load8(kr[k] + 8 * c), s[k]);
        }
        _mm256_storeu_ps(&scores[r * stride + j0], remp::sum_each(s));  // past seen[r]: never read
      }
    }
    for (int64_t r = 0; r < nr; ++r) {
      float* sr = &scores[r * stride];
      float m = sr[0];
#pragma omp simd reduction(max : m)
      for (int64_t j = 1; j < seen[r]; ++j) m = sr[j] > m ? sr[j] : m;
      float sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < seen[r]; ++j) {
        sr[j] = exp_approx(sr[j] - m);
        sum += sr[j];
      }
      norm[r] = 1.0f / sum;  // applied to the output, not to each weight
      std::fill(&acc[r * kD], &acc[r * kD] + kD, 0.0f);
    }
    for (int64_t j0 = 0; j0 < nkeys; j0 += kKeyTile) {
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t end = seen[r] < j0 + kKeyTile ? seen[r] : j0 + kKeyTile;
        for (int half = 0; half < kChunks; half += 8) {  // eight accumulators at a time stay in registers
          __m256 a[8];
          for (int c = 0; c < 8; ++c) a[c] = _mm256_loadu_ps(&acc[r * kD + 8 * (half + c)]);
          for (int64_t j = j0; j < end; ++j) {
            const __m256 p = _mm256_set1_ps(scores[r * stride + j]);
            const T* vr = v_head + keyoff[j] + 8 * half;
            for (int c = 0; c < 8; ++c) a[c] = _mm256_fmadd_ps(p, remp::load8(vr + 8 * c), a[c]);
          }
          for (int c = 0; c < 8; ++c) _mm256_storeu_ps(&acc[r * kD + 8 * (half + c)], a[c]);
        }
      }
    }
    for (int64_t r = 0; r < nr; ++r) {
      T* dst = head_row(out, out_row_stride, start, r0 + r, group, head, kD);
      for (int64_t d = 0; d < kD; ++d) dst[d] = remp::narrow(acc[r * kD + d] * norm[r], dst);
    }
  }
}
#endif

// The metadata is checked before anything is read through it: a query row past the batch, a context past its
// block table, or a block id past the cache would otherwise read (and write) out of bounds.
inline bool valid(int64_t rows_total, const int64_t* starts, const int64_t* qlens, const int64_t* ctxs,
                  const int64_t* tables, int64_t table_width, int64_t batch, int64_t bs, int64_t num_blocks) {
  for (int64_t b = 0; b < batch; ++b) {
    if (qlens[b] < 1 || qlens[b] > ctxs[b] || starts[b] < 0 || starts[b] + qlens[b] > rows_total) return false;
    const int64_t used = (ctxs[b] + bs - 1) / bs;
    if (used > table_width) return false;
    for (int64_t i = 0; i < used; ++i)
      if (tables[b * table_width + i] < 0 || tables[b * table_width + i] >= num_blocks) return false;
  }
  return true;
}

template <typename T, typename Acc>
int attend(const T* q, int64_t q_row_stride, const T* k_cache, const T* v_cache, int64_t head_stride, T* out,
           int64_t out_row_stride, int64_t rows_total, const int64_t* starts, const int64_t* qlens,
           const int64_t* ctxs, const int64_t* tables, int64_t table_width, int64_t batch, int64_t kv_heads,
           int64_t group, int64_t D, int64_t bs, int64_t num_blocks, double scale) {
  if (!valid(rows_total, starts, qlens, ctxs, tables, table_width, batch, bs, num_blocks)) return -1;
  int64_t max_ctx = 0;
  for (int64_t b = 0; b < batch; ++b) max_ctx = ctxs[b] > max_ctx ? ctxs[b] : max_ctx;
#pragma omp parallel
  {
    std::vector<Acc> scores(kRowTile * (max_ctx + 8)), qbuf(kRowTile * D), acc(kRowTile * D);
    std::vector<int64_t> keyoff(max_ctx);
    // longest contexts first would balance better; sequences arrive in no particular order, so dynamic it is
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < batch * kv_heads; ++w) {
      const int64_t b = w / kv_heads, h = w % kv_heads;
      const T *k_head = k_cache + h * head_stride, *v_head = v_cache + h * head_stride;
#if REMP_SIMD8
      if constexpr (std::is_same_v<Acc, float>) {
        auto vec = D == 64 ? attend_one_vec<T, 64> : D == 128 ? attend_one_vec<T, 128> : nullptr;
        if (vec) {
          vec(q, q_row_stride, k_head, v_head, out, out_row_stride, starts[b], qlens[b], ctxs[b],
              tables + b * table_width, group, h, bs, float(scale), scores, qbuf, acc, keyoff);
          continue;
        }
      }
#endif
      auto one = D == 64 ? attend_one<T, Acc, 64> : D == 128 ? attend_one<T, Acc, 128> : attend_one<T, Acc, 0>;
      one(q, q_row_stride, k_head, v_head, out, out_row_stride, starts[b], qlens[b], ctxs[b],
          tables + b * table_width, group, h, D, bs, Acc(scale), scores, qbuf, acc);
    }
  }
  return 0;
}

}  // namespace

// 0, or -1 when the metadata is out of bounds (nothing was computed)
#define REMP_PAGED_ATTENTION(NAME, T, ACC)                                                                        \
  extern "C" int NAME(const void* q, int64_t q_row_stride, const void* k_cache, const void* v_cache,              \
                      int64_t head_stride, void* out, int64_t out_row_stride, int64_t rows_total,                 \
                      const int64_t* starts, const int64_t* qlens, const int64_t* ctxs, const int64_t* tables,    \
                      int64_t table_width, int64_t batch, int64_t kv_heads, int64_t group, int64_t D, int64_t bs, \
                      int64_t num_blocks, double scale) {                                                         \
    return attend<T, ACC>(static_cast<const T*>(q), q_row_stride, static_cast<const T*>(k_cache),                 \
                          static_cast<const T*>(v_cache), head_stride, static_cast<T*>(out), out_row_stride,      \
                          rows_total, starts, qlens, ctxs, tables, table_width, batch, kv_heads, group, D, bs,    \
                          num_blocks, scale);                                                                     \
  }

REMP_PAGED_ATTENTION(remp_paged_attention_f32, float, float)
REMP_PAGED_ATTENTION(remp_paged_attention_f64, double, double)
REMP_PAGED_ATTENTION(remp_paged_attention_bf16, bf16, float)

// 1 where the 8-lane path was compiled in (a test holds AVX2 machines to it)
extern "C" int remp_paged_attention_simd8() { return REMP_SIMD8; }
