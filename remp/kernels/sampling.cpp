// A few vectorised passes per row over the whole vocabulary for what every decode step needs of its logits: the
// greedy token, or a token drawn at a temperature by inverse CDF from a uniform the caller drew, and the chosen
// token's raw logprob and rank. torch needs a pass per op (argmax, softmax, cumsum, searchsorted, log_softmax, compare, sum)
// over [rows, vocab]. Top-k, top-p and min-p stay in torch (remp/sampler.py). Beside it, for the rows that need
// them: guided decoding's mask, and the raw logprob and rank of a token sampled from reshaped logits.
#include <cstdint>

#include "numeric.h"

namespace {

constexpr int64_t kBlock = 256;  // tokens summed (or searched) in vectors before a scalar walk within a block

// The start of the first block of kBlock tokens that holds one with pred, or V.
template <typename T, typename Pred> int64_t first_block_with(const T* x, int64_t V, Pred pred) {
  for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
    const int64_t end = j0 + kBlock < V ? j0 + kBlock : V;
    int any = 0;
#pragma omp simd reduction(| : any)
    for (int64_t j = j0; j < end; ++j) any |= pred(x[j]);
    if (any) return j0;
  }
  return V;
}

// Inverse CDF over the weights exp((x - m) * inv_t), in token order: the first token whose cumulative weight
// exceeds u * total. A banned (-inf) token weighs exactly nothing. Whole blocks are skipped on their vector sum;
// the walk within a block is scalar, and goes on past it should its own rounding fall short of the target.
// `mass`: the weights' sum at temperature 1, which the caller has already.
template <typename T> int64_t draw(const T* x, int64_t V, T m, T inv_t, double u, double mass) {
  auto weight = [=](int64_t j) { return remp::exp_approx((x[j] - m) * inv_t); };
  double total = 0;
  if (inv_t == T(1)) {
    total = mass;
  } else {
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < V; ++j) total += weight(j);
  }
  const double target = u * total;
  double cum = 0;
  int64_t j = 0;
  for (; j < V; j += kBlock) {
    const int64_t end = j + kBlock < V ? j + kBlock : V;
    double block = 0;
#pragma omp simd reduction(+ : block)
    for (int64_t i = j; i < end; ++i) block += weight(i);
    if (cum + block > target) break;
    cum += block;
  }
  for (; j < V; ++j) {
    const T w = weight(j);
    cum += w;
    if (w > 0 && cum > target) return j;
  }
  // rounding left the target above the last sum: the last token with any weight, never a weightless one
  for (j = V - 1; j > 0 && !(weight(j) > 0); --j) {
  }
  return j;
}

template <typename T>
void sample(const T* logits, int64_t rows, int64_t V, const double* temperature, const double* uniform,
            int64_t* token, double* logprob, int64_t* rank) {
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t b = 0; b < rows; ++b) {
    const T* x = logits + b * V;
    T m = -INFINITY;
    int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
    for (int64_t j = 0; j < V; ++j) {
      nan |= x[j] != x[j];
      m = x[j] > m ? x[j] : m;
    }
    int64_t chosen = 0;
    if (nan || std::isinf(m)) {  // as torch: argmax is the first NaN (or the first +inf), log_softmax is NaN
      while (nan ? x[chosen] == x[chosen] : x[chosen] != m) ++chosen;
      token[b] = chosen;
      logprob[b] = NAN;
      rank[b] = 1;
      continue;
    }
    chosen = first_block_with(x, V, [m](T v) { return v == m; });  // the first maximum, as argmax
    while (x[chosen] != m) ++chosen;
    double mass = 0;
#pragma omp simd reduction(+ : mass)
    for (int64_t j = 0; j < V; ++j) mass += remp::exp_approx(x[j] - m);
    const double log_z = double(m) + std::log(mass);
    int64_t above = 0;  // the greedy token is the maximum: no token lies above it
    if (temperature[b] >= 1e-5) {
      chosen = draw(x, V, m, T(1.0 / temperature[b]), uniform[b], mass);
      const T picked = x[chosen];
#pragma omp simd reduction(+ : above)
      for (int64_t j = 0; j < V; ++j) above += x[j] > picked;
    }
    token[b] = chosen;
    logprob[b] = double(x[chosen]) - log_z;
    rank[b] = above + 1;
  }
}

// Guided decoding's mask: the tokens a row's bitmask does not allow (bit j of word i allows token 32 i + j), and
// the tokens past its width, to -inf in place. A word that allows all its 32 tokens (most of them, inside a JSON
// string) costs one compare.
template <typename T>
void apply_bitmask(T* logits, int64_t V, int64_t n, const int64_t* rows, const int32_t* masks, int64_t W) {
#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < n; ++k) {
    T* x = logits + rows[k] * V;
    const int32_t* m = masks + k * W;
    const int64_t covered = V < 32 * W ? V : 32 * W;
    for (int64_t i = 0; i * 32 < covered; ++i) {
      const uint32_t w = uint32_t(m[i]);
      if (w == 0xFFFFFFFFu) continue;
      const int64_t end = (i + 1) * 32 < covered ? (i + 1) * 32 : covered;
      for (int64_t j = i * 32; j < end; ++j)
        if (!((w >> (j & 31)) & 1u)) x[j] = T(-INFINITY);
    }
    for (int64_t j = covered; j < V; ++j) x[j] = T(-INFINITY);
  }
}

// The raw logprob and 1-based rank of a given token in each listed row: the chosen tokens of rows that logit bias
// or penalties reshaped before sampling, whose logprobs describe the logits before that. The same passes, and the
// same NaN and infinity rules, as sample()'s.
template <typename T>
void logprob_rank(const T* logits, int64_t V, int64_t n, const int64_t* rows, const int64_t* tokens, double* logprob,
                  int64_t* rank) {
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t k = 0; k < n; ++k) {
    const T* x = logits + rows[k] * V;
    T m = -INFINITY;
    int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
    for (int64_t j = 0; j < V; ++j) {
      nan |= x[j] != x[j];
      m = x[j] > m ? x[j] : m;
    }
    if (nan || std::isinf(m)) {
      logprob[k] = NAN;
      rank[k] = 1;
      continue;
    }
    double mass = 0;
#pragma omp simd reduction(+ : mass)
    for (int64_t j = 0; j < V; ++j) mass += remp::exp_approx(x[j] - m);
    const T picked = x[tokens[k]];
    int64_t above = 0;
#pragma omp simd reduction(+ : above)
    for (int64_t j = 0; j < V; ++j) above += x[j] > picked;
    logprob[k] = double(picked) - (double(m) + std::log(mass));
    rank[k] = above + 1;
  }
}

}  // namespace

#define REMP_SAMPLE(SUFFIX, T)                                                                                  \
  extern "C" void remp_sample_##SUFFIX(const void* logits, int64_t rows, int64_t V, const double* temperature,  \
                                       const double* uniform, int64_t* token, double* logprob, int64_t* rank) {  \
    sample<T>(static_cast<const T*>(logits), rows, V, temperature, uniform, token, logprob, rank);              \
  }

#define REMP_MASK_AND_LOGPROB(SUFFIX, T)                                                                        \
  extern "C" void remp_apply_bitmask_##SUFFIX(void* logits, int64_t V, int64_t n, const int64_t* rows,            \
                                              const int32_t* masks, int64_t W) {                                  \
    apply_bitmask<T>(static_cast<T*>(logits), V, n, rows, masks, W);                                            \
  }                                                                                                             \
  extern "C" void remp_logprob_rank_##SUFFIX(const void* logits, int64_t V, int64_t n, const int64_t* rows,        \
                                             const int64_t* tokens, double* logprob, int64_t* rank) {             \
    logprob_rank<T>(static_cast<const T*>(logits), V, n, rows, tokens, logprob, rank);                          \
  }

REMP_SAMPLE(f32, float)
REMP_SAMPLE(f64, double)
REMP_MASK_AND_LOGPROB(f32, float)
REMP_MASK_AND_LOGPROB(f64, double)
