// What the kernels share: bf16 as the high half of a float32, and a vectorisable exp.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace remp {

struct bf16 {
  uint16_t bits;
};
inline float widen(float x) { return x; }
inline double widen(double x) { return x; }
inline float widen(bf16 x) {
  uint32_t u = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float narrow(float x, float*) { return x; }
inline double narrow(double x, double*) { return x; }
inline bf16 narrow(float x, bf16*) {  // round to nearest even, as torch does; a NaN stays a NaN
  uint32_t u;
  std::memcpy(&u, &x, 4);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = (u >> 16) | 0x40u;
  return bf16{uint16_t(x != x ? nan : rounded)};
}
// x rounded to T and back: what storing in T and reading again gives
template <typename T, typename Acc> inline Acc round_to(Acc x) { return widen(narrow(x, static_cast<T*>(nullptr))); }

// e^x: Cephes' expf (within about 2 ulp), branch-free so that loops over it vectorise; 0 below -87.3, where
// float32 underflows (so a -inf logit weighs exactly nothing). float64 keeps the library's exp: it serves the
// exactness tests, where speed does not matter.
inline float exp_approx(float x) {
  const float in = x;
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  x = x - n * 0.693359375f + n * 2.12194440e-4f;
  const float z = x * x;
  float y = 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * z + x + 1.0f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return in < -87.3f ? 0.0f : y * scale;
}
inline double exp_approx(double x) { return std::exp(x); }

}  // namespace remp
