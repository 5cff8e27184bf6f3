// The elementwise work around a decoder layer's matmuls, fused: at decode batch sizes each torch op costs more in
// dispatch than in arithmetic, and at prefill sizes each unfused op is another pass over memory.
//   add_rms_norm: residual += delta (when given), then out = weight * rms_norm(residual);
//   silu_mul:     out = silu(gate) * up, from the fused [gate | up] projection;
//   rope_cache:   rotate q and k in place (rotate-half layout), then write k and v into their cache slots.
// Values are rounded to the model dtype where the torch reference stores them (it matters for bf16); in float32
// and float64 the compiler may fuse a multiply-add, so the last bit can differ from torch, never between topologies.
#include <cstdint>

#include "numeric.h"

namespace {

using remp::bf16;
using remp::round_to;
using remp::widen;

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

constexpr int64_t kParallelWork = 1 << 15;  // elements below which threads cost more than they save

template <typename T>
void add_rms_norm(T* residual, const T* delta, const T* weight, T* out, int64_t rows, int64_t H, double eps) {
  using Acc = typename AccOf<T>::type;
#pragma omp parallel for if (rows * H > kParallelWork)
  for (int64_t t = 0; t < rows; ++t) {
    T* x = residual + t * H;
    Acc ss = 0;
    if (delta) {
      const T* dx = delta + t * H;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < H; ++i) {
        const Acc v = round_to<T, Acc>(widen(x[i]) + widen(dx[i]));
        x[i] = remp::narrow(v, x);
        ss += v * v;
      }
    } else {
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < H; ++i) ss += widen(x[i]) * widen(x[i]);
    }
    const Acc r = Acc(1) / std::sqrt(ss / Acc(H) + Acc(eps));
    T* y = out + t * H;
#pragma omp simd
    for (int64_t i = 0; i < H; ++i) y[i] = remp::narrow(widen(weight[i]) * round_to<T, Acc>(widen(x[i]) * r), y);
  }
}

template <typename T>
void silu_mul(const T* gate_up, int64_t row_stride, T* out, int64_t rows, int64_t I) {
  using Acc = typename AccOf<T>::type;
#pragma omp parallel for if (rows * I > kParallelWork)
  for (int64_t t = 0; t < rows; ++t) {
    const T* g = gate_up + t * row_stride;
    const T* u = g + I;
    T* y = out + t * I;
#pragma omp simd
    for (int64_t i = 0; i < I; ++i) {
      const Acc x = widen(g[i]);
      const Acc s = round_to<T, Acc>(x / (Acc(1) + remp::exp_approx(-x)));
      y[i] = remp::narrow(s * widen(u[i]), y);
    }
  }
}

// qkv row: [q heads | k heads | v heads] x D; cos/sin rows: [D] for the token's position
template <typename T>
int rope_cache(T* qkv, int64_t row_stride, const T* cos, const T* sin, int64_t rows, int64_t q_heads,
               int64_t kv_heads, int64_t D, T* k_cache, T* v_cache, int64_t head_stride, const int64_t* slots) {
  using Acc = typename AccOf<T>::type;
  for (int64_t t = 0; t < rows; ++t)  // a slot past the cache would write out of bounds
    if (slots[t] < 0 || slots[t] >= head_stride / D) return -1;
  const int64_t half = D / 2;
#pragma omp parallel for if (rows * (q_heads + 2 * kv_heads) * D > kParallelWork)
  for (int64_t t = 0; t < rows; ++t) {
    T* row = qkv + t * row_stride;
    const T* c = cos + t * D;
    const T* s = sin + t * D;
    for (int64_t h = 0; h < q_heads + kv_heads; ++h) {
      T* x = row + h * D;
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const Acc a = widen(x[i]), b = widen(x[i + half]);
        // torch: x * cos + cat(-x2, x1) * sin, each product stored before the sum
        const Acc lo = round_to<T, Acc>(a * widen(c[i])) + round_to<T, Acc>(-b * widen(s[i]));
        const Acc hi = round_to<T, Acc>(b * widen(c[i + half])) + round_to<T, Acc>(a * widen(s[i + half]));
        x[i] = remp::narrow(lo, x);
        x[i + half] = remp::narrow(hi, x);
      }
    }
    for (int64_t h = 0; h < kv_heads; ++h) {
      const T* k = row + (q_heads + h) * D;
      const T* v = row + (q_heads + kv_heads + h) * D;
      T* kd = k_cache + h * head_stride + slots[t] * D;
      T* vd = v_cache + h * head_stride + slots[t] * D;
      for (int64_t i = 0; i < D; ++i) {
        kd[i] = k[i];
        vd[i] = v[i];
      }
    }
  }
  return 0;
}

}  // namespace

#define REMP_LAYER_OPS(SUFFIX, T)                                                                                \
  extern "C" void remp_add_rms_norm_##SUFFIX(void* residual, const void* delta, const void* weight, void* out,   \
                                             int64_t rows, int64_t H, double eps) {                              \
    add_rms_norm<T>(static_cast<T*>(residual), static_cast<const T*>(delta), static_cast<const T*>(weight),      \
                    static_cast<T*>(out), rows, H, eps);                                                         \
  }                                                                                                              \
  extern "C" void remp_silu_mul_##SUFFIX(const void* gate_up, int64_t row_stride, void* out, int64_t rows,       \
                                         int64_t I) {                                                            \
    silu_mul<T>(static_cast<const T*>(gate_up), row_stride, static_cast<T*>(out), rows, I);                     \
  }                                                                                                              \
  extern "C" int remp_rope_cache_##SUFFIX(void* qkv, int64_t row_stride, const void* cos, const void* sin,       \
                                          int64_t rows, int64_t q_heads, int64_t kv_heads, int64_t D,            \
                                          void* k_cache, void* v_cache, int64_t head_stride,                     \
                                          const int64_t* slots) {                                                \
    return rope_cache<T>(static_cast<T*>(qkv), row_stride, static_cast<const T*>(cos), static_cast<const T*>(sin),     \
                  rows, q_heads, kv_heads, D, static_cast<T*>(k_cache), static_cast<T*>(v_cache), head_stride,   \
                  slots);                                                                                        \
  }

REMP_LAYER_OPS(f32, float)
REMP_LAYER_OPS(f64, double)
REMP_LAYER_OPS(bf16, bf16)
