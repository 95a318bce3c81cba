// Fused dequantize-matmul for GGUF (ggml) block formats on the CPU.
//
// The weight keeps the file's bytes: uint8 [N, bytes_per_row], one row per output feature, each
// row a run of ggml blocks (the legacy 32-element formats regrouped per row into planes by
// `repack`, same size; gguf_formats.h). Two ways to multiply, chosen by the caller per call:
//   mm_int    M small (decode): the activations are quantized to int16 per 32-block
//             (relative error ~1.5e-5 of the block's max, far below bf16's); each 32-element
//             chunk of a weight row is unpacked to int16 lanes in registers and multiplied into
//             up to 4 activation rows by pmaddwd. Per sub-block (SUB elements sharing a scale)
//             y += scale_w * scale_x * sum(q_w * q_x) + min_w * sum(x).
//   mm_dense  M large (prefill, big batches): rows are dequantized in chunks to fp32 (or bf16
//             where the CPU multiplies bf16 natively) and handed to the BLAS gemm.
// Both run on ATen's intra-op thread pool, split over output rows.
//
// The block formats live in gguf_formats.h. Dequantization reproduces gguf.quants.dequantize
// bit for bit (built with -ffp-contract=off, so q*scale+min rounds twice as numpy does).
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "gguf_formats.h"

namespace kvyard_gguf {
namespace {

// ---- activations ------------------------------------------------------------------------------

// One activation row quantized per 32-block: x ~ q * d; sums of x per 16 and per 32 elements
// carry the min terms exactly.
struct QuantizedActs {
  int64_t M, K;
  std::vector<int16_t> q;        // [M, K]
  std::vector<float> d;          // [M, K/32]
  std::vector<float> sum16;      // [M, K/16]
  std::vector<float> sum32;      // [M, K/32]
};

void quantize_row(const float* x, int64_t K, int16_t* q, float* d, float* s16, float* s32) {
  for (int64_t b = 0; b < K / 32; ++b) {
    const float* xb = x + b * 32;
    float amax = 0.f, lo = 0.f, hi = 0.f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(xb[i]));
    for (int i = 0; i < 16; ++i) lo += xb[i];
    for (int i = 16; i < 32; ++i) hi += xb[i];
    const float db = amax / 32767.f;
    const float inv = db > 0.f ? 1.f / db : 0.f;
    for (int i = 0; i < 32; ++i) q[b * 32 + i] = int16_t(std::nearbyint(xb[i] * inv));
    d[b] = db;
    s16[2 * b] = lo;
    s16[2 * b + 1] = hi;
    s32[b] = lo + hi;
  }
}

QuantizedActs quantize_acts(const at::Tensor& x32) {
  QuantizedActs a;
  a.M = x32.size(0);
  a.K = x32.size(1);
  a.q.resize(a.M * a.K);
  a.d.resize(a.M * a.K / 32);
  a.sum16.resize(a.M * a.K / 16);
  a.sum32.resize(a.M * a.K / 32);
  const float* x = x32.data_ptr<float>();
  for (int64_t m = 0; m < a.M; ++m)
    quantize_row(x + m * a.K, a.K, a.q.data() + m * a.K, a.d.data() + m * a.K / 32,
                 a.sum16.data() + m * a.K / 16, a.sum32.data() + m * a.K / 32);
  return a;
}

// ---- the int16 kernel ------------------------------------------------------------------------

#ifdef KVYARD_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// out[m, n] for weight rows [n0, n1) and the MT activation rows from m0: each 32-element chunk
// is unpacked once into registers and multiplied into all MT rows. Two accumulator sets
// (even/odd chunks) keep the fma chains short.
template <class F, int MT>
void int_rows(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1,
              const QuantizedActs& a, int64_t m0, float* out, int64_t N) {
  constexpr int PER = F::QK / F::SUB, CH = F::QK / 32;
  const int64_t K = a.K, blocks = K / F::QK;
  const std::vector<float>& xsum = F::SUB == 16 ? a.sum16 : a.sum32;
  const int16_t* xq[MT];
  const float* dx[MT];
  const float* xs[MT];
  for (int m = 0; m < MT; ++m) {
    xq[m] = a.q.data() + (m0 + m) * K;
    dx[m] = a.d.data() + (m0 + m) * (K / 32);
    xs[m] = xsum.data() + (m0 + m) * (K / F::SUB);
  }
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    __m256 acc0[MT], acc1[MT], vmin[MT];
    float macc[MT];
    for (int m = 0; m < MT; ++m) {
      acc0[m] = acc1[m] = vmin[m] = _mm256_setzero_ps();
      macc[m] = 0.f;
    }
    auto block = [&](int64_t blk, __m256 (&even)[MT], __m256 (&odd)[MT]) {
      alignas(32) float scale[PER], min[PER];
      alignas(32) float f[MT][PER];   // scale_w * d_x per sub-block
      F::scales(row, blk, blocks, scale, min);
      if constexpr (PER == 1) {
        for (int m = 0; m < MT; ++m) {
          f[m][0] = scale[0] * dx[m][blk];
          if constexpr (F::HAS_MIN) macc[m] += min[0] * xs[m][blk];
        }
      } else {  // a 256-element super-block: 8 activation scales, 8 or 16 weight scales
        for (int m = 0; m < MT; ++m) {
          const __m256 d8 = _mm256_loadu_ps(dx[m] + blk * CH);
          if constexpr (F::SUB == 32) {
            _mm256_store_ps(f[m], _mm256_mul_ps(_mm256_load_ps(scale), d8));
          } else {  // sub-blocks of 16: activation scale j/2 for weight scale j
            const __m256 lo = _mm256_permutevar8x32_ps(d8, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
            const __m256 hi = _mm256_permutevar8x32_ps(d8, _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7));
            _mm256_store_ps(f[m], _mm256_mul_ps(_mm256_load_ps(scale), lo));
            _mm256_store_ps(f[m] + 8, _mm256_mul_ps(_mm256_load_ps(scale + 8), hi));
          }
          if constexpr (F::HAS_MIN)
            for (int s = 0; s < PER; s += 8)
              vmin[m] = _mm256_fmadd_ps(_mm256_load_ps(min + s),
                                        _mm256_loadu_ps(xs[m] + blk * PER + s), vmin[m]);
        }
      }
#pragma GCC unroll 8
      for (int c = 0; c < CH; ++c) {
        __m256i w0, w1;
        F::unpack(row, blk, blocks, c, w0, w1);
        const int64_t e = blk * F::QK + c * 32;
        for (int m = 0; m < MT; ++m) {
          const __m256i p0 = _mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i*)(xq[m] + e)));
          const __m256i p1 =
              _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i*)(xq[m] + e + 16)));
          if constexpr (F::SUB == 32) {
            __m256& acc = (c % 2 == 0) ? even[m] : odd[m];
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(p0, p1)),
                                  _mm256_broadcast_ss(&f[m][c]), acc);
          } else {
            even[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_broadcast_ss(&f[m][2 * c]),
                                      even[m]);
            odd[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_broadcast_ss(&f[m][2 * c + 1]),
                                     odd[m]);
          }
        }
      }
    };
    int64_t blk = 0;
    for (; blk + 1 < blocks; blk += 2) {
      block(blk, acc0, acc1);
      block(blk + 1, acc1, acc0);
    }
    if (blk < blocks) block(blk, acc0, acc1);
    for (int m = 0; m < MT; ++m)
      out[(m0 + m) * N + n] =
          hsum(_mm256_add_ps(_mm256_add_ps(acc0[m], acc1[m]), vmin[m])) + macc[m];
  }
}

// The planar legacy formats (gguf_formats.h). Per row, a first pass turns 8 fp16 scales at a
// time into f[blk] = d_blk * dx_blk (one vcvtph2ps + one vmulps) and accumulates the min/offset
// term sum_blk (m_blk - OFFSET * d_blk) * sum(x_blk); the block loop is then only unpack,
// pmaddwd and one fma per activation row. f: scratch of MT * nb floats.
template <class P, int MT>
void int_rows_planar(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1,
                     const QuantizedActs& a, int64_t m0, float* out, int64_t N, float* f) {
  const int64_t K = a.K, nb = K / 32, full = nb / 8 * 8;
  constexpr bool SHIFTED = P::MIN_FIELD >= 0 || P::OFFSET != 0;
  const int16_t* xq[MT];
  const float* dx[MT];
  const float* xs[MT];
  for (int m = 0; m < MT; ++m) {
    xq[m] = a.q.data() + (m0 + m) * K;
    dx[m] = a.d.data() + (m0 + m) * nb;
    xs[m] = a.sum32.data() + (m0 + m) * nb;
  }
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    const uint8_t* d_plane = P::field(row, nb, 0);
    const uint8_t* m_plane = P::field(row, nb, P::MIN_FIELD >= 0 ? P::MIN_FIELD : 0);
    __m256 shifted[MT];
    float shifted_tail[MT];
    for (int m = 0; m < MT; ++m) {
      shifted[m] = _mm256_setzero_ps();
      shifted_tail[m] = 0.f;
    }
    for (int64_t g = 0; g < full; g += 8) {
      const __m256 d8 = _mm256_cvtph_ps(load16(d_plane + g * 2));
      __m256 shift = _mm256_setzero_ps();
      if constexpr (P::MIN_FIELD >= 0) shift = _mm256_cvtph_ps(load16(m_plane + g * 2));
      if constexpr (P::OFFSET != 0)
        shift = _mm256_fnmadd_ps(_mm256_set1_ps(float(P::OFFSET)), d8, shift);
      for (int m = 0; m < MT; ++m) {
        _mm256_storeu_ps(f + m * nb + g, _mm256_mul_ps(d8, _mm256_loadu_ps(dx[m] + g)));
        if constexpr (SHIFTED)
          shifted[m] = _mm256_fmadd_ps(shift, _mm256_loadu_ps(xs[m] + g), shifted[m]);
      }
    }
    for (int64_t blk = full; blk < nb; ++blk) {
      const float d = half_at(d_plane + blk * 2);
      float shift = 0.f;
      if constexpr (P::MIN_FIELD >= 0) shift = half_at(m_plane + blk * 2);
      if constexpr (P::OFFSET != 0) shift -= float(P::OFFSET) * d;
      for (int m = 0; m < MT; ++m) {
        f[m * nb + blk] = d * dx[m][blk];
        shifted_tail[m] += shift * xs[m][blk];
      }
    }
    __m256 acc0[MT], acc1[MT];
    for (int m = 0; m < MT; ++m) acc0[m] = acc1[m] = _mm256_setzero_ps();
    auto step = [&](int64_t blk, __m256 (&acc)[MT]) {
      __m256i w0, w1;
      unpack_planar<P>(row, blk, nb, w0, w1);
      for (int m = 0; m < MT; ++m) {
        const int16_t* x = xq[m] + blk * 32;
        const __m256i p = _mm256_add_epi32(
            _mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i*)x)),
            _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i*)(x + 16))));
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcast_ss(f + m * nb + blk),
                                 acc[m]);
      }
    };
    int64_t blk = 0;
    for (; blk + 1 < nb; blk += 2) {
      step(blk, acc0);
      step(blk + 1, acc1);
    }
    if (blk < nb) step(blk, acc0);
    for (int m = 0; m < MT; ++m)
      out[(m0 + m) * N + n] =
          hsum(_mm256_add_ps(_mm256_add_ps(acc0[m], acc1[m]), shifted[m])) + shifted_tail[m];
  }
}

// The row range [n0, n1) for every activation row, in tiles of up to 4 rows.
template <class F>
void int_rows_all(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1,
                  const QuantizedActs& a, float* out, int64_t N) {
  std::vector<float> scratch(is_planar<F> ? 4 * a.K / 32 : 0);
  for (int64_t m0 = 0; m0 < a.M; m0 += 4) {
    const int64_t mt = std::min<int64_t>(4, a.M - m0);
    auto run = [&]<int MT>() {
      if constexpr (is_planar<F>)
        int_rows_planar<F, MT>(w, row_bytes, n0, n1, a, m0, out, N, scratch.data());
      else
        int_rows<F, MT>(w, row_bytes, n0, n1, a, m0, out, N);
    };
    if (mt == 1) run.template operator()<1>();
    else if (mt == 2) run.template operator()<2>();
    else if (mt == 3) run.template operator()<3>();
    else run.template operator()<4>();
  }
}
#else
// Portable kernel: each weight row decoded to int16 once, then dotted with every activation row.
template <class F>
void int_rows_all(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1,
                  const QuantizedActs& a, float* out, int64_t N) {
  constexpr int PER = F::QK / F::SUB;
  const int64_t K = a.K, subs = K / F::SUB;
  const std::vector<float>& xsum = F::SUB == 16 ? a.sum16 : a.sum32;
  std::vector<int16_t> q(K);
  std::vector<float> scale(subs), min(subs);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    for (int64_t blk = 0; blk < K / F::QK; ++blk) {
      F::values(row, blk, K / F::QK, q.data() + blk * F::QK);
      F::scales(row, blk, K / F::QK, scale.data() + blk * PER, min.data() + blk * PER);
    }
    for (int64_t m = 0; m < a.M; ++m) {
      const int16_t* x = a.q.data() + m * K;
      const float* dx = a.d.data() + m * (K / 32);
      const float* xs = xsum.data() + m * subs;
      float y = 0.f;
      for (int64_t s = 0; s < subs; ++s) {
        int32_t p = 0;
        for (int i = 0; i < F::SUB; ++i)
          p += int32_t(q[s * F::SUB + i]) * int32_t(x[s * F::SUB + i]);
        y += float(p) * scale[s] * dx[s * F::SUB / 32] + min[s] * xs[s];
      }
      out[m * N + n] = y;
    }
  }
}
#endif

// ---- dequantization ---------------------------------------------------------------------------

template <class F, class T>
void dequant_rows_portable(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1, int64_t K,
                           T* out) {
  constexpr int PER = F::QK / F::SUB;
  int16_t q[F::QK];
  float scale[PER], min[PER];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    for (int64_t blk = 0; blk < K / F::QK; ++blk) {
      F::values(row, blk, K / F::QK, q);
      F::scales(row, blk, K / F::QK, scale, min);
      T* o = out + (n - n0) * K + blk * F::QK;
      for (int e = 0; e < F::QK; ++e) {
        const float v = float(q[e]) * scale[e / F::SUB];
        o[e] = T(F::HAS_MIN ? v + min[e / F::SUB] : v);
      }
    }
  }
}

#ifdef KVYARD_AVX2
// 8 floats -> 8 bf16, rounded to nearest even (the weights are finite: no NaN case).
inline __m128i to_bf16(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(
      _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

// 16 int16 lanes -> q * scale (+ min) as 16 values of T at o; mul then add, as gguf.quants
// rounds.
template <bool HAS_MIN, class T>
inline void store_dequant16(__m256i q, float scale, float min, T* o) {
  const __m256 s = _mm256_set1_ps(scale), m = _mm256_set1_ps(min);
  __m256 lo = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(q))), s);
  __m256 hi = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(q, 1))), s);
  if constexpr (HAS_MIN) {
    lo = _mm256_add_ps(lo, m);
    hi = _mm256_add_ps(hi, m);
  }
  if constexpr (std::is_same_v<T, float>) {
    _mm256_storeu_ps(o, lo);
    _mm256_storeu_ps(o + 8, hi);
  } else {
    _mm_storeu_si128((__m128i*)o, to_bf16(lo));
    _mm_storeu_si128((__m128i*)(o + 8), to_bf16(hi));
  }
}

template <class F, class T>
void dequant_rows_avx2(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1, int64_t K,
                       T* out) {
  constexpr int PER = F::QK / F::SUB, CH = F::QK / 32;
  const int64_t nb = K / F::QK;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    for (int64_t blk = 0; blk < nb; ++blk) {
      T* o = out + (n - n0) * K + blk * F::QK;
      __m256i w0, w1;
      if constexpr (is_planar<F>) {   // one 32-block: w = d * (u - OFFSET) (+ m)
        unpack_planar<F>(row, blk, nb, w0, w1);
        const __m256i off = _mm256_set1_epi16(F::OFFSET);
        const float d = half_at(F::field(row, nb, 0) + blk * 2);
        const float m = F::MIN_FIELD >= 0 ? half_at(F::field(row, nb, F::MIN_FIELD) + blk * 2) : 0.f;
        store_dequant16<F::HAS_MIN>(_mm256_sub_epi16(w0, off), d, m, o);
        store_dequant16<F::HAS_MIN>(_mm256_sub_epi16(w1, off), d, m, o + 16);
      } else {
        alignas(32) float scale[PER], min[PER];
        F::scales(row, blk, nb, scale, min);
#pragma GCC unroll 8
        for (int c = 0; c < CH; ++c) {
          F::unpack(row, blk, nb, c, w0, w1);
          const int s0 = F::SUB == 32 ? c : 2 * c, s1 = F::SUB == 32 ? c : 2 * c + 1;
          store_dequant16<F::HAS_MIN>(w0, scale[s0], min[s0], o + c * 32);
          store_dequant16<F::HAS_MIN>(w1, scale[s1], min[s1], o + c * 32 + 16);
        }
      }
    }
  }
}
#endif

// Rows [n0, n1) dequantized into out [n1 - n0, K].
template <class F, class T>
void dequant_rows(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1, int64_t K, T* out) {
#ifdef KVYARD_AVX2
  dequant_rows_avx2<F, T>(w, row_bytes, n0, n1, K, out);
#else
  dequant_rows_portable<F, T>(w, row_bytes, n0, n1, K, out);
#endif
}

template <class F>
void check_weight(const at::Tensor& w, int64_t K) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte && w.dim() == 2 &&
                  w.is_contiguous(),
              "kvyard_gguf: weight must be a contiguous CPU uint8 tensor [rows, bytes_per_row]");
  TORCH_CHECK(K % F::QK == 0 && w.size(1) == K / F::QK * F::BYTES, "kvyard_gguf: in_features ",
              K, " does not match ", w.size(1), " bytes per row of ", F::QK, "-element blocks");
}

at::Tensor as_float_2d(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.size(1) == K,
              "kvyard_gguf: x must be a CPU tensor [M, ", K, "]");
  return x.to(at::kFloat).contiguous();
}

at::Tensor finish(at::Tensor out, const std::optional<at::Tensor>& bias, at::ScalarType dtype) {
  if (bias.has_value()) out.add_(bias->to(at::kFloat));
  return out.to(dtype);
}

// Rows per parallel task: enough work per task to hide the pool's fork/join.
int64_t row_grain(int64_t K, int64_t M) {
  return std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, K * M));
}

at::Tensor mm_int(const at::Tensor& x, const at::Tensor& w, int64_t qtype, int64_t K,
                  const std::optional<at::Tensor>& bias) {
  const at::Tensor x32 = as_float_2d(x, K);
  const int64_t M = x32.size(0), N = w.size(0);
  at::Tensor out = at::empty({M, N}, x32.options());
  dispatch(qtype, [&](auto fmt) {
    using F = decltype(fmt);
    check_weight<F>(w, K);
    const QuantizedActs acts = quantize_acts(x32);
    const uint8_t* wp = w.data_ptr<uint8_t>();
    float* op = out.data_ptr<float>();
    // Groups of 16 weight rows stay in L1 while every activation tile passes over them.
    at::parallel_for(0, N, row_grain(K, M), [&](int64_t n0, int64_t n1) {
      for (int64_t g = n0; g < n1; g += 16)
        int_rows_all<F>(wp, w.size(1), g, std::min(g + 16, n1), acts, op, N);
    });
  });
  return finish(out, bias, x.scalar_type());
}

// Dequantizes chunks of rows and multiplies each with one single-threaded gemm inside the
// parallel region. Chunks are as large as a 4 MiB fp32 tile allows (bigger gemms run closer to
// the BLAS peak) but at least one per thread, and at least 64 rows.
int64_t dense_chunk_rows(int64_t N, int64_t K) {
  const int64_t per_thread = (N + at::get_num_threads() - 1) / at::get_num_threads();
  const int64_t by_size = (int64_t(1) << 20) / K;
  return std::max<int64_t>(64, std::min(per_thread, by_size));
}

at::Tensor mm_dense(const at::Tensor& x, const at::Tensor& w, int64_t qtype, int64_t K,
                    const std::optional<at::Tensor>& bias, bool bf16_gemm) {
  const at::ScalarType gemm_dtype = bf16_gemm ? at::kBFloat16 : at::kFloat;
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.size(1) == K,
              "kvyard_gguf: x must be a CPU tensor [M, ", K, "]");
  const at::Tensor xg = x.to(gemm_dtype).contiguous();
  const int64_t M = xg.size(0), N = w.size(0);
  const int64_t CHUNK = dense_chunk_rows(N, K);
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  dispatch(qtype, [&](auto fmt) {
    using F = decltype(fmt);
    check_weight<F>(w, K);
    const uint8_t* wp = w.data_ptr<uint8_t>();
    const int64_t chunks = (N + CHUNK - 1) / CHUNK;
    // The pool's threads do not inherit the caller's inference mode; the tensor ops below
    // (an in-place copy into `out`, an inference tensor under torch.inference_mode) need it.
    const at::ThreadLocalState caller_state;
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      at::ThreadLocalStateGuard state_guard(caller_state);
      at::Tensor tile = at::empty({CHUNK, K}, xg.options());
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t n0 = c * CHUNK, rows = std::min(CHUNK, N - n0);
        if (bf16_gemm)
          dequant_rows<F>(wp, w.size(1), n0, n0 + rows, K, tile.data_ptr<c10::BFloat16>());
        else
          dequant_rows<F>(wp, w.size(1), n0, n0 + rows, K, tile.data_ptr<float>());
        const at::Tensor y = at::mm(xg, tile.narrow(0, 0, rows).t());   // [M, rows]
        out.narrow(1, n0, rows).copy_(y);
      }
    });
  });
  return finish(out, bias, x.scalar_type());
}

// [N, K] in dtype: written directly for float32 and bfloat16, converted from float32 otherwise.
at::Tensor dequantize(const at::Tensor& w, int64_t qtype, int64_t K, at::ScalarType dtype) {
  const int64_t N = w.size(0);
  const bool bf16 = dtype == at::kBFloat16;
  at::Tensor out = at::empty({N, K}, w.options().dtype(bf16 ? at::kBFloat16 : at::kFloat));
  dispatch(qtype, [&](auto fmt) {
    using F = decltype(fmt);
    check_weight<F>(w, K);
    const uint8_t* wp = w.data_ptr<uint8_t>();
    at::parallel_for(0, N, row_grain(K, 1), [&](int64_t n0, int64_t n1) {
      if (bf16)
        dequant_rows<F>(wp, w.size(1), n0, n1, K, out.data_ptr<c10::BFloat16>() + n0 * K);
      else
        dequant_rows<F>(wp, w.size(1), n0, n1, K, out.data_ptr<float>() + n0 * K);
    });
  });
  return out.to(dtype);
}

// File layout -> planar layout (same shape) for the legacy formats; see gguf_formats.h.
at::Tensor repack(const at::Tensor& w, int64_t qtype, int64_t K) {
  at::Tensor out = at::empty_like(w);
  bool done = false;
  dispatch(PLANAR_BASE + qtype, [&](auto fmt) {
    using P = decltype(fmt);
    if constexpr (is_planar<P>) {
      check_weight<P>(w, K);
      for (int64_t n = 0; n < w.size(0); ++n)
        P::repack_row(w.data_ptr<uint8_t>() + n * w.size(1), out.data_ptr<uint8_t>() + n * w.size(1),
                      K / 32);
      done = true;
    }
  });
  TORCH_CHECK(done, "kvyard_gguf: no planar layout for ggml type id ", qtype);
  return out;
}

// Whether this build multiplies bf16 natively (AVX512-BF16 or AMX), i.e. whether the dense path
// should feed the gemm bf16 instead of fp32.
bool native_bf16() {
#if defined(__AVX512BF16__) || defined(__AMX_BF16__)
  return true;
#else
  return false;
#endif
}

bool has_simd() {
#ifdef KVYARD_AVX2
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace kvyard_gguf

TORCH_LIBRARY(kvyard_gguf, m) {
  m.def("mm_int(Tensor x, Tensor w, int qtype, int in_features, Tensor? bias) -> Tensor");
  m.def("mm_dense(Tensor x, Tensor w, int qtype, int in_features, Tensor? bias, bool bf16_gemm)"
        " -> Tensor");
  m.def("dequantize(Tensor w, int qtype, int in_features, ScalarType dtype) -> Tensor");
  m.def("repack(Tensor w, int qtype, int in_features) -> Tensor");
  m.def("native_bf16() -> bool", &kvyard_gguf::native_bf16);
  m.def("has_simd() -> bool", &kvyard_gguf::has_simd);
}

TORCH_LIBRARY_IMPL(kvyard_gguf, CPU, m) {
  m.impl("mm_int", &kvyard_gguf::mm_int);
  m.impl("mm_dense", &kvyard_gguf::mm_dense);
  m.impl("dequantize", &kvyard_gguf::dequantize);
  m.impl("repack", &kvyard_gguf::repack);
}
