// Small SIMD helpers shared by kvyard's C++ kernels (core and plugins). cpp_build puts this
// folder on every library's include path and hashes this file into every build key.
#pragma once

#if defined(__AVX2__)
#include <immintrin.h>

namespace kvyard_simd {

// Sum / max of the 8 lanes: halves added pairwise, then within the 128-bit half.
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace kvyard_simd
#endif
