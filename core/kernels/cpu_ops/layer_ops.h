// The per-row arithmetic of kvyard's fused layer ops, shared by the dispatcher ops
// (fused_ops.cpp) and the native decode step (decode_loop/native_step.cpp), so both round exactly
// alike: the torch path's order of operations (layers/norm.py, layers/rotary.py,
// layers/activation.py), rounding to the activation dtype where the torch path rounds.
// Includers build with -ffp-contract=off: a*b+c rounds twice, as the ATen kernels do.
//
//   add_residual_and_square, normalize_row   rmsnorm, around ATen's own row sum of the squares
//   rotary_head                              one head: x * cos + rotate_half(x) * sin
//   silu_and_mul_row                         silu(gate) * up
// No function allocates, throws or opens a parallel region.
#pragma once

#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace kvyard_layer_ops {

// Rounds a float to T the way an ATen op with output dtype T does.
template <class T>
inline float round_to(float v) { return static_cast<float>(static_cast<T>(v)); }

// The squares' row sums come from ATen's own sum kernel: its summation order is what the torch
// path's mean uses (mean = sum / N on the CPU), so float32 results stay bitwise equal to it and to
// transformers. Everything else is one pass per row here.
template <class T>
inline void add_residual_and_square(const T* x, const T* r, int64_t n, T* summed, float* squares) {
  for (int64_t i = 0; i < n; ++i) {
    const T v = r != nullptr ? static_cast<T>(float(x[i]) + float(r[i])) : x[i];
    if (r != nullptr) summed[i] = v;
    squares[i] = float(v) * float(v);
  }
}

template <class T>
inline void normalize_row(const T* src, const T* w, float sum_squares, float eps, int64_t n, T* out) {
  const float mean = sum_squares / static_cast<float>(n);
  const float inv_rms = 1.0f / std::sqrt(mean + eps);
  for (int64_t i = 0; i < n; ++i)
    out[i] = static_cast<T>(round_to<T>(float(src[i]) * inv_rms) * float(w[i]));
}

// x * cos is one rounded op; ATen's float addcmul then adds rotate_half(x) * sin with one fused
// multiply-add (measured bitwise), its bfloat16 one in float rounded once at the end.
template <class T>
inline void rotary_head(const T* x, const T* cos, const T* sin, int64_t d, T* out) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < d; ++i) {
    const float rotated = i < half ? -float(x[i + half]) : float(x[i - half]);
    const float x_cos = round_to<T>(float(x[i]) * float(cos[i]));
    out[i] = static_cast<T>(std::fma(rotated, float(sin[i]), x_cos));
  }
}

#if defined(__AVX2__) && defined(__FMA__)
// ATen's vectorized float exp on AVX2 (libtorch_cpu exports it): with it silu is bitwise ATen's.
extern "C" __m256 Sleef_expf8_u10(__m256);

// silu(g) = g / (1 + exp(-g)) on 8 lanes, as ATen's vectorized silu computes it.
inline __m256 silu8(__m256 g) {
  const __m256 neg = _mm256_xor_ps(g, _mm256_set1_ps(-0.0f));
  return _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), Sleef_expf8_u10(neg)));
}

inline void silu_to(const float* g, int64_t d, float* out) {
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) _mm256_storeu_ps(out + i, silu8(_mm256_loadu_ps(g + i)));
  if (i < d) {   // the tail through the same lanes, as ATen's partial vector does
    alignas(32) float lanes[8] = {};
    std::memcpy(lanes, g + i, (d - i) * sizeof(float));
    _mm256_store_ps(lanes, silu8(_mm256_load_ps(lanes)));
    std::memcpy(out + i, lanes, (d - i) * sizeof(float));
  }
}
#else
inline void silu_to(const float* g, int64_t d, float* out) {
  for (int64_t i = 0; i < d; ++i) out[i] = g[i] / (1.0f + std::exp(-g[i]));
}
#endif

// silu(gate) rounds to T, then the product with up rounds again (two ATen ops on the torch path).
template <class T>
inline void silu_and_mul_row(const T* gate, const T* up, int64_t d, float* scratch, T* out) {
  if constexpr (std::is_same_v<T, float>) {
    silu_to(gate, d, scratch);
  } else {
    for (int64_t i = 0; i < d; ++i) scratch[i] = float(gate[i]);
    silu_to(scratch, d, scratch);
  }
  for (int64_t i = 0; i < d; ++i) out[i] = static_cast<T>(round_to<T>(scratch[i]) * float(up[i]));
}

}  // namespace kvyard_layer_ops
