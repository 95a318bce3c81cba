// Paged decode attention on the CPU: one query token per sequence against its cached K/V, read
// straight from the pool through req_to_token (no gather copy), softmax in float32.
//
//   q        [B, H, D]          float32 or bfloat16
//   k_pool   [S, Hkv, D]        the layer's pool (same dtype as q, or float32)
//   v_pool   [S, Hkv, D]
//   table    int32 [R, L]       req_to_token; row 0 is all zeros (dummy slot 0)
//   rows     int64 [B]          table row of each sequence
//   lens     int64 [B]          tokens of each sequence with K/V (0 for a padded row: it reads
//                               slot 0 once so its output stays finite)
//   -> out   [B, H, D]          q's dtype
//
// Work is split over (sequence, kv head) pairs; each pair handles its group of H / Hkv query
// heads, whose K/V rows stay in cache between heads. Per query head: scores = q.k * scale for
// every cached token, max-subtracted exp, then out = (sum_t p_t v_t) / sum_t p_t, accumulation in
// float32. For head_dim 64 and 128 (AVX2) the scores take eight tokens per horizontal reduction and
// the value sum keeps its D accumulators in registers: 3.5-5x the per-token loop (batch 32 x 192
// tokens, SmolLM2 heads, one thread: ~0.77 vs 2.8-3.9 ms per layer; benchmarks/cpu/paged_decode.py).
//
// native_decode(k_pool, v_pool, heads, scale) -> the same per-pair code as a kvyard_native.h
// attention descriptor (uint8 tensor) for the C++ decode step, which splits the pairs itself.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <new>
#include <vector>

#include "kvyard_native.h"
#include "kvyard_simd.h"

namespace kvyard_attn {
namespace {

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define KVYARD_AVX2 1

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

using kvyard_simd::hsum;

// exp(x) for x <= 0 (max-subtracted scores), Cephes' polynomial: within 2 ulp of expf.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.33654f));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}
#endif

template <typename T>
inline float dot(const float* q, const T* k, int64_t d) {
  int64_t i = 0;
  float sum = 0;
#ifdef KVYARD_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= d; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(k + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), load8(k + i + 8), acc1);
  }
  for (; i + 8 <= d; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(k + i), acc0);
  sum = hsum(_mm256_add_ps(acc0, acc1));
#endif
  for (; i < d; ++i) sum += q[i] * static_cast<float>(k[i]);
  return sum;
}

// y += a * x
template <typename T>
inline void axpy(float a, const T* x, float* y, int64_t d) {
  int64_t i = 0;
#ifdef KVYARD_AVX2
  const __m256 va = _mm256_set1_ps(a);
  for (; i + 8 <= d; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, load8(x + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < d; ++i) y[i] += a * static_cast<float>(x[i]);
}

// s[t] = exp(s[t] - max(s)); returns the sum
inline float softmax_numerator(float* s, int64_t n) {
  const float m = *std::max_element(s, s + n);
  int64_t t = 0;
  float sum = 0;
#ifdef KVYARD_AVX2
  const __m256 vm = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  for (; t + 8 <= n; t += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), vm));
    _mm256_storeu_ps(s + t, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = hsum(acc);
#endif
  for (; t < n; ++t) {
    s[t] = std::exp(s[t] - m);
    sum += s[t];
  }
  return sum;
}

#ifdef KVYARD_AVX2
// Eight sums at once: [sum(a0), ..., sum(a7)] as one vector.
inline __m256 hsum8(const __m256 (&a)[8]) {
  const __m256 h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 lo = _mm256_hadd_ps(h01, h23), hi = _mm256_hadd_ps(h45, h67);
  return _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
}

// scores[t] = q . k_t * scale for t < len, eight tokens per pass so one horizontal reduction
// serves eight dot products (the per-token reduction was the kernel's bottleneck). NC = D / 8.
template <int NC, typename KV>
void scores_blocked(const float* q, const KV* kp, const int32_t* slots, int64_t len, int64_t slot_stride,
                    float scale, float* scores) {
  int64_t t = 0;
  for (; t + 8 <= len; t += 8) {
    __m256 acc[8];
    for (int j = 0; j < 8; ++j) {
      const KV* k = kp + static_cast<int64_t>(slots[t + j]) * slot_stride;
      __m256 a = _mm256_mul_ps(_mm256_loadu_ps(q), load8(k));
#pragma GCC unroll 16
      for (int c = 1; c < NC; ++c) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * c), load8(k + 8 * c), a);
      acc[j] = a;
    }
    _mm256_storeu_ps(scores + t, _mm256_mul_ps(hsum8(acc), _mm256_set1_ps(scale)));
  }
  for (; t < len; ++t)
    scores[t] = dot(q, kp + static_cast<int64_t>(slots[t]) * slot_stride, NC * 8) * scale;
}

// out[0:D] = sum_t p[t] v_t, the D accumulators held in registers across all tokens.
template <int NC, typename KV>
void weighted_values(const float* p, const KV* vp, const int32_t* slots, int64_t len, int64_t slot_stride,
                     float* out) {
  __m256 acc[NC];
  for (int c = 0; c < NC; ++c) acc[c] = _mm256_setzero_ps();
  for (int64_t t = 0; t < len; ++t) {
    const KV* v = vp + static_cast<int64_t>(slots[t]) * slot_stride;
    const __m256 w = _mm256_set1_ps(p[t]);
#pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) acc[c] = _mm256_fmadd_ps(w, load8(v + 8 * c), acc[c]);
  }
  for (int c = 0; c < NC; ++c) _mm256_storeu_ps(out + 8 * c, acc[c]);
}

// One (sequence, kv head) pair for head_dim = 8 * NC: G query heads against len cached tokens.
template <int NC, typename KV>
void pair_blocked(const float* qf, const KV* kp, const KV* vp, const int32_t* slots, int64_t len,
                  int64_t G, int64_t slot_stride, float scale, float* scores, float* acc, float* denom) {
  for (int64_t g = 0; g < G; ++g) {
    float* s = scores + g * len;
    scores_blocked<NC>(qf + g * NC * 8, kp, slots, len, slot_stride, scale, s);
    denom[g] = softmax_numerator(s, len);
    weighted_values<NC>(s, vp, slots, len, slot_stride, acc + g * NC * 8);
  }
}
#endif

// The pairs [p0, p1) of (sequence b = p / Hkv, kv head h = p % Hkv): out[b, hG:(h+1)G] for the
// G query heads of group h. Both the op's parallel tasks and the native descriptor run this.
template <typename Q, typename KV>
void decode_pairs(const Q* qp, const KV* kp, const KV* vp, const int32_t* tp, int64_t table_stride,
                  const int64_t* rp, const int64_t* lp, int64_t H, int64_t Hkv, int64_t D, float fscale, Q* op,
                  int64_t p0, int64_t p1) {
  const int64_t G = H / Hkv, slot_stride = Hkv * D;
  std::vector<float> qf(G * D), acc(G * D), denom(G), scores;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t b = p / Hkv, h = p % Hkv;
    const int64_t len = std::max<int64_t>(lp[b], 1);
    const int32_t* slots = tp + rp[b] * table_stride;
    const Q* qb = qp + (b * H + h * G) * D;
    for (int64_t i = 0; i < G * D; ++i) qf[i] = static_cast<float>(qb[i]);
    scores.resize(G * len);
    const KV* kh = kp + h * D;
    const KV* vh = vp + h * D;
#ifdef KVYARD_AVX2
    if (D == 64 || D == 128) {
      if (D == 64)
        pair_blocked<8>(qf.data(), kh, vh, slots, len, G, slot_stride, fscale, scores.data(), acc.data(), denom.data());
      else
        pair_blocked<16>(qf.data(), kh, vh, slots, len, G, slot_stride, fscale, scores.data(), acc.data(), denom.data());
    } else
#endif
    {
      for (int64_t t = 0; t < len; ++t) {
        const KV* k = kh + static_cast<int64_t>(slots[t]) * slot_stride;
        for (int64_t g = 0; g < G; ++g) scores[g * len + t] = dot(qf.data() + g * D, k, D) * fscale;
      }
      for (int64_t g = 0; g < G; ++g) denom[g] = softmax_numerator(scores.data() + g * len, len);
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t t = 0; t < len; ++t) {
        const KV* v = vh + static_cast<int64_t>(slots[t]) * slot_stride;
        for (int64_t g = 0; g < G; ++g) axpy(scores[g * len + t], v, acc.data() + g * D, D);
      }
    }
    Q* ob = op + (b * H + h * G) * D;
    for (int64_t g = 0; g < G; ++g)
      for (int64_t i = 0; i < D; ++i) ob[g * D + i] = static_cast<Q>(acc[g * D + i] / denom[g]);
  }
}

template <typename Q, typename KV>
void decode(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
            const at::Tensor& table, const at::Tensor& rows, const at::Tensor& lens, double scale,
            at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k_pool.size(1);
  at::parallel_for(0, B * Hkv, 1, [&](int64_t p0, int64_t p1) {
    decode_pairs(q.data_ptr<Q>(), k_pool.data_ptr<KV>(), v_pool.data_ptr<KV>(), table.data_ptr<int32_t>(),
                 table.stride(0), rows.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), H, Hkv, D,
                 static_cast<float>(scale), out.data_ptr<Q>(), p0, p1);
  });
}

// ---- the native decode attention (kvyard_native.h) ------------------------------------------

struct NativeAttention {
  kvyard_native_attention desc;   // first: the descriptor's address is the tensor's
  const void *k_pool, *v_pool;
  float scale;
};

template <typename T>
void native_pairs(const void* ctx, const void* q, const int32_t* table, int64_t table_stride, const int64_t* rows,
                  const int64_t* lens, int64_t, void* out, int64_t p0, int64_t p1) {
  const auto& A = *static_cast<const NativeAttention*>(ctx);
  decode_pairs(static_cast<const T*>(q), static_cast<const T*>(A.k_pool), static_cast<const T*>(A.v_pool), table,
               table_stride, rows, lens, A.desc.heads, A.desc.kv_heads, A.desc.head_dim, A.scale,
               static_cast<T*>(out), p0, p1);
}

// Descriptor bytes for one layer's pools (q, out and the pools in the pools' dtype); the pools
// must outlive every use of it.
at::Tensor native_decode(const at::Tensor& k_pool, const at::Tensor& v_pool, int64_t heads, double scale) {
  TORCH_CHECK(k_pool.dim() == 3 && v_pool.sizes() == k_pool.sizes() && k_pool.is_contiguous() &&
                  v_pool.is_contiguous() && k_pool.scalar_type() == v_pool.scalar_type(),
              "native_decode: contiguous pools [S, Hkv, D] of one dtype expected");
  TORCH_CHECK(heads > 0 && heads % k_pool.size(1) == 0, "native_decode: heads must be a multiple of Hkv");
  const auto dt = k_pool.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, "native_decode: float32 or bfloat16 pools expected");
  at::Tensor bytes = at::empty({int64_t(sizeof(NativeAttention))}, at::kByte);
  auto* A = new (bytes.data_ptr()) NativeAttention{};
  const bool bf16 = dt == at::kBFloat16;
  A->desc = kvyard_native_attention{KVYARD_NATIVE_ABI, A, bf16 ? KVYARD_NATIVE_BF16 : KVYARD_NATIVE_F32, heads,
                                    k_pool.size(1), k_pool.size(2),
                                    bf16 ? &native_pairs<c10::BFloat16> : &native_pairs<float>};
  A->k_pool = k_pool.data_ptr();
  A->v_pool = v_pool.data_ptr();
  A->scale = static_cast<float>(scale);
  return bytes;
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                        const at::Tensor& table, const at::Tensor& rows, const at::Tensor& lens,
                        double scale) {
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 3 && v_pool.sizes() == k_pool.sizes(),
              "paged_decode: q [B, H, D] and pools [S, Hkv, D] expected");
  TORCH_CHECK(q.size(2) == k_pool.size(2) && q.size(1) % k_pool.size(1) == 0,
              "paged_decode: head_dim must match and H must be a multiple of Hkv");
  TORCH_CHECK(table.scalar_type() == at::kInt && rows.scalar_type() == at::kLong &&
                  lens.scalar_type() == at::kLong,
              "paged_decode: table int32, rows and lens int64 expected");
  TORCH_CHECK(rows.numel() == q.size(0) && lens.numel() == q.size(0),
              "paged_decode: rows and lens need one entry per sequence");
  TORCH_CHECK(q.is_contiguous() && k_pool.is_contiguous() && v_pool.is_contiguous() &&
                  table.stride(1) == 1 && rows.is_contiguous() && lens.is_contiguous(),
              "paged_decode: contiguous inputs expected");
  at::Tensor out = at::empty(q.sizes(), q.options());
  const auto qt = q.scalar_type(), kt = k_pool.scalar_type();
  if (qt == at::kFloat && kt == at::kFloat) {
    decode<float, float>(q, k_pool, v_pool, table, rows, lens, scale, out);
  } else if (qt == at::kBFloat16 && kt == at::kBFloat16) {
    decode<c10::BFloat16, c10::BFloat16>(q, k_pool, v_pool, table, rows, lens, scale, out);
  } else if (qt == at::kBFloat16 && kt == at::kFloat) {
    decode<c10::BFloat16, float>(q, k_pool, v_pool, table, rows, lens, scale, out);
  } else {
    TORCH_CHECK(false, "paged_decode: unsupported dtypes q ", qt, " pool ", kt);
  }
  return out;
}

}  // namespace
}  // namespace kvyard_attn

TORCH_LIBRARY(kvyard_attn, m) {
  m.def("native_decode(Tensor k_pool, Tensor v_pool, int heads, float scale) -> Tensor",
        &kvyard_attn::native_decode);
  m.def("paged_decode(Tensor q, Tensor k_pool, Tensor v_pool, Tensor table, Tensor rows, "
        "Tensor lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvyard_attn, CPU, m) { m.impl("paged_decode", &kvyard_attn::paged_decode); }
