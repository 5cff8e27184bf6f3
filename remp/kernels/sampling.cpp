// One pass per row over the whole vocabulary for what every decode step needs of its logits: the greedy token,
// or a token drawn at a temperature by inverse CDF from a uniform the caller drew, and the chosen token's raw
// logprob and rank. torch needs a pass per op (argmax, softmax, cumsum, searchsorted, log_softmax, compare, sum)
// over [rows, vocab]. Top-k, top-p and min-p stay in torch (remp/sampler.py).
#include <cstdint>

#include "numeric.h"

namespace {

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
    while (x[chosen] != m) ++chosen;  // the first maximum: ties go to the lowest id, as argmax
    double mass = 0;
#pragma omp simd reduction(+ : mass)
    for (int64_t j = 0; j < V; ++j) mass += remp::exp_approx(x[j] - m);
    const double log_z = double(m) + std::log(mass);
    if (temperature[b] >= 1e-5) {
      const T inv_t = T(1.0 / temperature[b]);
      // weights exp((x - max) / t): a banned (-inf) token weighs exactly nothing
      double total = 0;
#pragma omp simd reduction(+ : total)
      for (int64_t j = 0; j < V; ++j) total += remp::exp_approx((x[j] - m) * inv_t);
      const double target = uniform[b] * total;
      double cum = 0;
      int64_t last_weighed = chosen;  // rounding could leave the target above the last sum: then the last
      bool found = false;              // token with any weight, never a weightless one
      for (int64_t j = 0; j < V && !found; ++j) {
        const T w = remp::exp_approx((x[j] - m) * inv_t);
        cum += w;
        if (w > 0) last_weighed = j;
        found = cum > target;  // the first token whose cumulative weight exceeds the target
      }
      chosen = last_weighed;
    }
    const T picked = x[chosen];
    int64_t above = 0;
#pragma omp simd reduction(+ : above)
    for (int64_t j = 0; j < V; ++j) above += x[j] > picked;
    token[b] = chosen;
    logprob[b] = double(picked) - log_z;
    rank[b] = above + 1;
  }
}

}  // namespace

#define REMP_SAMPLE(SUFFIX, T)                                                                                  \
  extern "C" void remp_sample_##SUFFIX(const void* logits, int64_t rows, int64_t V, const double* temperature,  \
                                       const double* uniform, int64_t* token, double* logprob, int64_t* rank) {  \
    sample<T>(static_cast<const T*>(logits), rows, V, temperature, uniform, token, logprob, rank);              \
  }

REMP_SAMPLE(f32, float)
REMP_SAMPLE(f64, double)
