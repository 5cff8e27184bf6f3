// 8-lane float vectors where the CPU has AVX2 and FMA (every x86 CPU remp targets, AVX512 ones included), for the
// loops gcc does not vectorise well by itself: dot products that end in a horizontal sum. REMP_SIMD8 is 0
// elsewhere, and the kernels then keep their plain loops.
#pragma once

#if defined(__AVX2__) && defined(__FMA__)
#define REMP_SIMD8 1
#include <immintrin.h>

#include "numeric.h"

namespace remp {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) {  // bf16 is the high half of a float32
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

template <int kBytes> inline void prefetch_row(const void* p) {
  for (int i = 0; i < kBytes; i += 64) _mm_prefetch(static_cast<const char*>(p) + i, _MM_HINT_T1);
}

// the sum of v's eight lanes
inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

// lane k: the sum of v[k]'s eight lanes
inline __m256 sum_each(const __m256 v[8]) {
  const __m256 a = _mm256_hadd_ps(v[0], v[1]), b = _mm256_hadd_ps(v[2], v[3]);
  const __m256 c = _mm256_hadd_ps(v[4], v[5]), d = _mm256_hadd_ps(v[6], v[7]);
  const __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);  // halves: v0..v3 over lanes 0-3 | 4-7
  return _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20), _mm256_permute2f128_ps(ab, cd, 0x31));
}

}  // namespace remp
#else
#define REMP_SIMD8 0
#endif
