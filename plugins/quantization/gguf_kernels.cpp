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
//             The legacy formats (planar) go by groups of 8 or 6 blocks: the exact int32 block
//             sums of a group are gathered into one vector, so the float work is one fma per
//             group (int_rows_planar); Q4/Q5 read two blocks per 32-byte load, the activations
//             stored in that load's lane order. (int8 activations with u8 x s8 pmaddubsw would
//             be faster but measured too coarse: kept-quantized greedy decoding of SmolLM2 then
//             matched the dequantized model on 4 of 8 prompts, against 8 of 8 with int16.)
//             With AVX-512 VNNI: Q4_0/Q4_1/Q8_0 weights are laid out at load in tiles of 16
//             interleaved rows (X16, gguf_formats.h), and x16_tile512 sums each row in its own
//             int32 lane with vpdpwssd on the same int16 activations (no reduction; ~1.9x the
//             AVX2 kernel at M = 1); Q5_0/Q5_1 stay planar (int_rows_planar, WIDE: 512-bit pair dots). The SIMD level
//             is read per call (simd_level: the build's best unless set_simd_level lowered it);
//             x is read as it comes (float32 or bfloat16) and y written in x's dtype, no copies.
//   mm_dense  M large (prefill, big batches): rows are dequantized in blocks of 64 to fp32 (or
//             bf16 where the CPU multiplies bf16 natively), K-major ([K, rows]: X16 weights'
//             natural order), and multiplied by oneDNN's brgemm micro-kernel over the whole K,
//             so the sums' order does not depend on the thread count (the library gemm's did).
// Both run on ATen's intra-op thread pool (OpenMP), split over output rows; every output value
// is computed by one thread in an order fixed by the shapes: the same bits on any thread count.
//   native_linear  mm_int as a kvyard_native.h descriptor, for the C++ decode step: the same
//             activation quantization and row kernels (int_tiles), no dispatcher, no threads.
//
// The block formats live in gguf_formats.h. Dequantization reproduces gguf.quants.dequantize
// bit for bit (built with -ffp-contract=off, so q*scale+min rounds twice as numpy does).
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/Context.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <new>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "gguf_formats.h"
#include "kvyard_native.h"
#include "kvyard_simd.h"

namespace kvyard_gguf {
namespace {

// ---- activations ------------------------------------------------------------------------------

#ifdef KVYARD_AVX2
using kvyard_simd::hmax;
using kvyard_simd::hsum;
#endif

// Which SIMD the int kernel uses: the best this build has (-march=native: the CPU's), lowered at
// run time by set_simd_level (tests, and KVYARD_GGUF_SIMD, read by gguf_kernels.py).
enum SimdLevel : int64_t { PORTABLE = 0, AVX2 = 1, AVX512 = 2 };
#if defined(KVYARD_AVX512)
constexpr int64_t BUILT_LEVEL = AVX512;
#elif defined(KVYARD_AVX2)
constexpr int64_t BUILT_LEVEL = AVX2;
#else
constexpr int64_t BUILT_LEVEL = PORTABLE;
#endif
std::atomic<int64_t> simd_limit{BUILT_LEVEL};

int64_t simd_level() { return std::min<int64_t>(simd_limit.load(std::memory_order_relaxed), BUILT_LEVEL); }

int64_t set_simd_level(int64_t level) {
  simd_limit.store(std::clamp<int64_t>(level, PORTABLE, BUILT_LEVEL));
  return simd_level();
}

// The order of each row's int16 activations, which must match the kernel's weight lanes:
//   ELEMENT  element order (portable, K-quants, Q8_0)
//   PAIRED   AVX2, nibble formats in the planar layout: blocks 2p and 2p+1 in the lane order of
//            unpack_pair (gguf_formats.h): 4 runs of 16, [2p: 8 | 2p+1: 8] each, holding
//            elements 2j, 2j+16, 2j+1, 2j+17 (j = 0..7)
//   SPLIT    AVX-512, nibble formats in the planar layout: blocks 2p and 2p+1 as
//            [2p: 0..15 | 2p+1: 0..15] [2p: 16..31 | 2p+1: 16..31] (unpack_split)
// An odd last block stays in element order.
enum class ActLayout { ELEMENT, PAIRED, SPLIT };

template <class F>
ActLayout act_layout(int64_t level) {
  if constexpr (is_planar<F>) {
    if (!F::SIGNED_BYTES && level == AVX512) return ActLayout::SPLIT;
    if (!F::SIGNED_BYTES && level == AVX2) return ActLayout::PAIRED;
  }
  return ActLayout::ELEMENT;
}

// Activation rows quantized to int16 per 32-block: x ~ q * d, d = max|x_blk| / 32767 (relative
// error ~1.5e-5 of the block's max); sums of x per 16 and per 32 elements carry the min terms
// exactly. d and the sums are zero-padded to whole groups of 8 blocks (nbp per row), which the
// planar kernels load 8 at a time. q is in the layout's order.
// The arrays live in memory the caller provides (acts_bytes / bind_acts): mm_int's thread-local
// buffer, or the native linear's scratch.
struct QuantizedActs {
  int64_t M, K, nb, nbp;
  int16_t* q;        // [M, K]
  float* d;          // [M, nbp]
  float* sum16;      // [M, 2 * nbp]
  float* sum32;      // [M, nbp]
};

constexpr int64_t ACTS_ALIGN = 64;

inline int64_t padded_blocks(int64_t K) { return (K / 32 + 7) / 8 * 8; }
inline int64_t aligned(int64_t bytes) { return (bytes + ACTS_ALIGN - 1) / ACTS_ALIGN * ACTS_ALIGN; }

// Bytes bind_acts needs for M rows of K (from a 64-byte aligned base).
inline int64_t acts_bytes(int64_t M, int64_t K) {
  return aligned(M * K * int64_t(sizeof(int16_t))) + aligned(M * padded_blocks(K) * 4 * int64_t(sizeof(float)));
}

// The arrays for M rows of K laid out in mem (acts_bytes(M, K) bytes, 64-byte aligned).
inline QuantizedActs bind_acts(void* mem, int64_t M, int64_t K) {
  QuantizedActs a{M, K, K / 32, padded_blocks(K), nullptr, nullptr, nullptr, nullptr};
  auto* base = static_cast<uint8_t*>(mem);
  a.q = reinterpret_cast<int16_t*>(base);
  a.d = reinterpret_cast<float*>(base + aligned(M * K * int64_t(sizeof(int16_t))));
  a.sum16 = a.d + M * a.nbp;
  a.sum32 = a.sum16 + M * 2 * a.nbp;
  return a;
}

// One 32-block in element order; returns d. lo, hi: the sums of elements 0..15 and 16..31.
// The AVX2 and portable versions round q alike (x * (1/d) to nearest even).
inline float quantize_block(const float* x, int16_t* q, float& lo, float& hi) {
#ifdef KVYARD_AVX2
  __m256 v[4], amax = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(_mm256_set1_ps(-0.f), v[i]));
  }
  const float d = hmax(amax) / 32767.f, inv = d > 0.f ? 1.f / d : 0.f;
  for (int h = 0; h < 2; ++h) {   // packs works per 128-bit lane: [0-3 8-11 | 4-7 12-15] -> order
    const __m256i q16 = _mm256_packs_epi32(
        _mm256_cvtps_epi32(_mm256_mul_ps(v[2 * h], _mm256_set1_ps(inv))),
        _mm256_cvtps_epi32(_mm256_mul_ps(v[2 * h + 1], _mm256_set1_ps(inv))));
    _mm256_storeu_si256((__m256i*)(q + 16 * h), _mm256_permute4x64_epi64(q16, 0xD8));
  }
  lo = hsum(_mm256_add_ps(v[0], v[1]));
  hi = hsum(_mm256_add_ps(v[2], v[3]));
  return d;
#else
  float amax = 0.f;
  lo = hi = 0.f;
  for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[i]));
  for (int i = 0; i < 16; ++i) lo += x[i];
  for (int i = 16; i < 32; ++i) hi += x[i];
  const float d = amax / 32767.f, inv = d > 0.f ? 1.f / d : 0.f;
  for (int i = 0; i < 32; ++i) q[i] = int16_t(std::nearbyint(x[i] * inv));
  return d;
#endif
}

// 32 activations as floats: float rows are read in place, bfloat16 ones widened into buf.
inline const float* block_floats(const float* x, float*) { return x; }
inline const float* block_floats(const c10::BFloat16* x, float* buf) {
#ifdef KVYARD_AVX2
  for (int i = 0; i < 4; ++i) {   // bf16 bits are a float's top half
    const __m128i h = _mm_loadu_si128((const __m128i*)(x + 8 * i));
    _mm256_storeu_ps(buf + 8 * i, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
  }
#else
  for (int i = 0; i < 32; ++i) buf[i] = float(x[i]);
#endif
  return buf;
}

#ifdef KVYARD_AVX2
// Two blocks in element order (a, b) -> the pair's 64 values in unpack_pair's lane order:
//   [a 0,2..14 | b 0,2..14] [a 16,18..30 | b ...] [a 1,3..15 | b ...] [a 17,19..31 | b ...]
inline void pair_lanes(const int16_t* a, const int16_t* b, int16_t* out) {
  // per 128-bit lane: 8 values -> [4 even | 4 odd]; then qwords -> [8 even | 8 odd]
  const __m256i even_odd = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15,
                                            0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
  auto split = [&](const int16_t* p) {   // 16 values -> [8 even | 8 odd]
    return _mm256_permute4x64_epi64(
        _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i*)p), even_odd), 0xD8);
  };
  for (int h = 0; h < 2; ++h) {   // elements 16h .. 16h + 15
    const __m256i sa = split(a + 16 * h), sb = split(b + 16 * h);
    _mm256_storeu_si256((__m256i*)(out + 16 * h), _mm256_permute2x128_si256(sa, sb, 0x20));
    _mm256_storeu_si256((__m256i*)(out + 32 + 16 * h), _mm256_permute2x128_si256(sa, sb, 0x31));
  }
}
#endif

// Two blocks in element order (a, b) -> the pair's 64 values in the layout's order.
inline void order_pair(const int16_t* a, const int16_t* b, int16_t* out, ActLayout layout) {
#ifdef KVYARD_AVX2
  if (layout == ActLayout::PAIRED) return pair_lanes(a, b, out);
#endif
  TORCH_CHECK(layout == ActLayout::SPLIT, "kvyard_gguf: no pair order for this layout");
  std::memcpy(out, a, 32);
  std::memcpy(out + 16, b, 32);
  std::memcpy(out + 32, a + 16, 32);
  std::memcpy(out + 48, b + 16, 32);
}

// x [M, K] (rows ldx elements apart, float or bfloat16) -> a, bound to its memory for M rows of K.
template <class T>
void quantize_into(const T* x, int64_t ldx, QuantizedActs& a, ActLayout layout) {
  std::fill(a.d, a.d + a.M * 4 * a.nbp, 0.f);   // d, sum16, sum32: zero padding past nb
  const int64_t paired_blocks = layout == ActLayout::ELEMENT ? 0 : a.nb / 2 * 2;
  for (int64_t m = 0; m < a.M; ++m) {
    int16_t* q = a.q + m * a.K;
    alignas(32) int16_t pair[64];   // a pair's two blocks in element order
    alignas(32) float buf[32];
    for (int64_t blk = 0; blk < a.nb; ++blk) {
      const bool in_pair = blk < paired_blocks;
      float lo, hi;
      int16_t* dst = in_pair ? pair + blk % 2 * 32 : q + blk * 32;
      const float d = quantize_block(block_floats(x + m * ldx + blk * 32, buf), dst, lo, hi);
      a.d[m * a.nbp + blk] = d;
      a.sum16[m * 2 * a.nbp + 2 * blk] = lo;
      a.sum16[m * 2 * a.nbp + 2 * blk + 1] = hi;
      a.sum32[m * a.nbp + blk] = lo + hi;
      if (in_pair && blk % 2 == 1) order_pair(pair, pair + 32, q + (blk - 1) * 32, layout);
    }
  }
}

// x [M, K] row-major -> the calling thread's buffers (reused call after call: a decode step
// makes ~120 calls of the same few shapes).
template <class T>
const QuantizedActs& quantize_acts(const T* x, int64_t M, int64_t K, ActLayout layout) {
  thread_local std::vector<uint8_t> mem;
  thread_local QuantizedActs a;
  const size_t bytes = acts_bytes(M, K) + ACTS_ALIGN;
  if (mem.size() < bytes) mem.resize(bytes);
  const auto base = (reinterpret_cast<uintptr_t>(mem.data()) + ACTS_ALIGN - 1) / ACTS_ALIGN * ACTS_ALIGN;
  a = bind_acts(reinterpret_cast<void*>(base), M, K);
  quantize_into(x, K, a, layout);
  return a;
}

// ---- the int16 kernels ------------------------------------------------------------------------

// The MT activation rows from m0 as the kernels read them: int16 values, block scales d and
// block sums (of 32 elements; of 16 with sum16, two per block).
template <int MT>
struct ActRows {
  const int16_t* xq[MT];
  const float* dx[MT];
  const float* xs[MT];
  ActRows(const QuantizedActs& a, int64_t m0, bool sum16 = false) {
    for (int m = 0; m < MT; ++m) {
      xq[m] = a.q + (m0 + m) * a.K;
      dx[m] = a.d + (m0 + m) * a.nbp;
      xs[m] = sum16 ? a.sum16 + (m0 + m) * 2 * a.nbp : a.sum32 + (m0 + m) * a.nbp;
    }
  }
};

// Where a kernel writes its float results: out(m, n) for activation row m and weight row n of a
// tile of rows [n0, n0 + ld).
struct OutTile {
  float* p;
  int64_t ld, n0;
  float& operator()(int64_t m, int64_t n) const { return p[m * ld + n - n0]; }
};

#ifdef KVYARD_AVX2
// out[m, n] for weight rows [n0, n1) and the MT activation rows from m0: each 32-element chunk
// is unpacked once into registers and multiplied into all MT rows. Two accumulator sets
// (even/odd chunks) keep the fma chains short.
template <class F, int MT>
void int_rows(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1,
              const QuantizedActs& a, int64_t m0, OutTile out) {
  constexpr int PER = F::QK / F::SUB, CH = F::QK / 32;
  const int64_t K = a.K, blocks = K / F::QK;
  const ActRows<MT> rows(a, m0, F::SUB == 16);
  const auto& xq = rows.xq;
  const auto& dx = rows.dx;
  const auto& xs = rows.xs;
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
      out(m0 + m, n) =
          hsum(_mm256_add_ps(_mm256_add_ps(acc0[m], acc1[m]), vmin[m])) + macc[m];
  }
}

// ---- the planar legacy formats: groups of blocks ----------------------------------------------
//
// Per weight row, one pass over groups of G blocks: G = 8, or 6 where nb is a multiple of 6 but
// not of 8 (K = 576: 3 groups of 6). A group costs, per activation row, one fma for
// sum_blk f_blk * dot_blk (f = d_w * d_x of the group in one vector, dot_blk the block's exact
// int32 dot product) and one for the min/offset term sum_blk (m - OFFSET * d_w) * sum(x_blk).
// The int32 partial sums reach one lane per block through shuffles and adds (pair_sums,
// quad_sums) instead of a cvt + fma per block. Any other nb ends with a tail of nb % 8 blocks:
// one fma per step (a pair or a block), scales from the 8 blocks ending at nb.

// G fp16 values of a plane for blocks [g, g + G) -> floats. For G = 6, lanes 6 and 7 hold the
// next blocks' values while g + 8 <= nb, else 0 (never read past the plane's end); the dots of
// those lanes are 0 and group_scales masks them out of the min/offset term.
template <int G>
inline __m256 halves(const uint8_t* plane, int64_t g, int64_t nb) {
  const uint8_t* p = plane + g * 2;
  if (G == 8 || g + 8 <= nb) return _mm256_cvtph_ps(load16(p));
  return _mm256_cvtph_ps(_mm_insert_epi32(_mm_loadl_epi64((const __m128i*)p), int(u32_at(p + 8)), 2));
}

// The tail's 8 fp16 values: blocks [nb - 8, nb), or [0, nb) and zeros where nb < 8 (K < 256).
inline __m256 tail_halves(const uint8_t* plane, int64_t nb) {
  if (nb >= 8) return _mm256_cvtph_ps(load16(plane + (nb - 8) * 2));
  alignas(16) uint8_t part[16] = {};
  std::memcpy(part, plane, nb * 2);
  return _mm256_cvtph_ps(load16(part));
}

// Sums of int32 partials within each 128-bit lane:
//   pair_sums(a, b)   per lane [a b a b]   (a, b: 4 partials each)
//   quad_sums(ab, cd) per lane [a b c d]   (from two pair_sums)
inline __m256i pair_sums(__m256i a, __m256i b) {
  return _mm256_add_epi32(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b));
}
inline __m256i quad_sums(__m256i ab, __m256i cd) {
  return _mm256_add_epi32(_mm256_unpacklo_epi64(ab, cd), _mm256_unpackhi_epi64(ab, cd));
}

// The dot products of one step with the MT activation rows, as int32 partial sums:
//   PAIR (a nibble pair, blocks blk and blk + 1): [4 partials of blk | 4 of blk + 1]
//   one block (Q8_0; an odd last nibble block): 8 partials
// |partial| <= 4 * 2 * 31 * 32767 (nibble pair) or 2 * 2 * 128 * 32767 (Q8_0): int32 is exact.
template <class P, int MT, bool PAIR>
inline void step_dots(const uint8_t* row, int64_t blk, int64_t nb, const int16_t* const (&xq)[MT],
                      __m256i (&out)[MT]) {
  auto x_at = [&](int m, int k) {   // the k-th 16 activations of the step
    return _mm256_loadu_si256((const __m256i*)(xq[m] + blk * 32 + k * 16));
  };
  if constexpr (PAIR) {
    __m256i v[4];
    unpack_pair<P>(row, blk, nb, v);
    for (int m = 0; m < MT; ++m)
      out[m] = _mm256_add_epi32(
          _mm256_add_epi32(_mm256_madd_epi16(v[0], x_at(m, 0)), _mm256_madd_epi16(v[1], x_at(m, 1))),
          _mm256_add_epi32(_mm256_madd_epi16(v[2], x_at(m, 2)), _mm256_madd_epi16(v[3], x_at(m, 3))));
  } else {
    __m256i w0, w1;
    unpack_planar<P>(row, blk, nb, w0, w1);
    for (int m = 0; m < MT; ++m)
      out[m] = _mm256_add_epi32(_mm256_madd_epi16(w0, x_at(m, 0)), _mm256_madd_epi16(w1, x_at(m, 1)));
  }
}

// One int32 lane per block of the group [g, g + G) (0 in lanes past G): the nibble formats
// (G / 2 pairs) in the order [g g+2 g+4 g+6 | g+1 g+3 g+5 g+7], Q8_0 in block order.
template <class P, int MT, int G>
inline void group_dots(const uint8_t* row, int64_t g, int64_t nb, const int16_t* const (&xq)[MT],
                       __m256i (&dots)[MT]) {
  const __m256i zero = _mm256_setzero_si256();
  if constexpr (P::SIGNED_BYTES) {   // [0 1 2 3 | 0 1 2 3] + [4 5 6 7 | 4 5 6 7]: add the halves
    __m256i v[G][MT], lo[MT], hi[MT];
#pragma GCC unroll 8
    for (int b = 0; b < G; ++b) step_dots<P, MT, false>(row, g + b, nb, xq, v[b]);
    for (int m = 0; m < MT; ++m) {
      lo[m] = quad_sums(pair_sums(v[0][m], v[1][m]), pair_sums(v[2][m], v[3][m]));
      __m256i v67 = zero;
      if constexpr (G == 8) v67 = pair_sums(v[6][m], v[7][m]);
      hi[m] = quad_sums(pair_sums(v[4][m], v[5][m]), v67);
      dots[m] = _mm256_add_epi32(_mm256_permute2x128_si256(lo[m], hi[m], 0x20),
                                 _mm256_permute2x128_si256(lo[m], hi[m], 0x31));
    }
  } else {
    __m256i v01[MT], v23[MT], a[MT], b[MT];
    step_dots<P, MT, true>(row, g, nb, xq, a);
    step_dots<P, MT, true>(row, g + 2, nb, xq, b);
    for (int m = 0; m < MT; ++m) v01[m] = pair_sums(a[m], b[m]);
    step_dots<P, MT, true>(row, g + 4, nb, xq, a);
    if constexpr (G == 8) step_dots<P, MT, true>(row, g + 6, nb, xq, b);
    for (int m = 0; m < MT; ++m) {
      v23[m] = pair_sums(a[m], G == 8 ? b[m] : zero);
      dots[m] = quad_sums(v01[m], v23[m]);
    }
  }
}

// f[m] = d_w * d_x for the 8 lanes from block g, and shifted[m] += the min/offset term
// (m - OFFSET * d_w) * sum(x) of those lanes (MASK: of the lanes in `keep`).
template <class P, int MT, bool MASK>
[[gnu::always_inline]] inline void group_scales(__m256 d8, __m256 m8, __m256 keep, int64_t g,
                                                const float* const (&dx)[MT],
                                                const float* const (&xs)[MT], __m256 (&f)[MT],
                                                __m256 (&shifted)[MT]) {
  for (int m = 0; m < MT; ++m) f[m] = _mm256_mul_ps(d8, _mm256_loadu_ps(dx[m] + g));
  if constexpr (P::MIN_FIELD >= 0 || P::OFFSET != 0) {
    __m256 shift = P::MIN_FIELD >= 0 ? m8 : _mm256_setzero_ps();
    if constexpr (P::OFFSET != 0)
      shift = _mm256_fnmadd_ps(_mm256_set1_ps(float(P::OFFSET)), d8, shift);
    if constexpr (MASK) shift = _mm256_and_ps(shift, keep);
    for (int m = 0; m < MT; ++m)
      shifted[m] = _mm256_fmadd_ps(shift, _mm256_loadu_ps(xs[m] + g), shifted[m]);
  }
}

// The tail: blocks [nb / 8 * 8, nb), one fma per step; the scales are the 8 lanes from `base`.
template <class P, int MT>
[[gnu::noinline]] void tail_dots(const uint8_t* row, int64_t nb, const int16_t* const (&xq)[MT],
               const float* const (&dx)[MT], const float* const (&xs)[MT], __m256 (&acc)[MT],
               __m256 (&shifted)[MT]) {
  const int64_t full = nb / 8 * 8, base = std::max<int64_t>(0, nb - 8);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 keep = _mm256_castsi256_ps(
      _mm256_cmpgt_epi32(lane, _mm256_set1_epi32(int(full - base) - 1)));   // lanes >= full - base
  __m256 f[MT];
  const __m256 m8 = P::MIN_FIELD >= 0 ? tail_halves(P::field(row, nb, std::max(P::MIN_FIELD, 0)), nb)
                                      : _mm256_setzero_ps();
  const __m256 d8 = tail_halves(P::field(row, nb, 0), nb);
  group_scales<P, MT, true>(d8, m8, keep, base, dx, xs, f, shifted);
  constexpr int STEP = P::SIGNED_BYTES ? 1 : 2;
  for (int64_t blk = full; blk < nb; blk += STEP) {
    const bool pair = STEP == 2 && blk + 1 < nb;
    __m256i dots[MT];
    if (pair) step_dots<P, MT, true>(row, blk, nb, xq, dots);
    else step_dots<P, MT, false>(row, blk, nb, xq, dots);
    // the lanes of f: [blk x4 | blk+1 x4] for a pair, [blk x8] for one block
    const __m256i pick = _mm256_add_epi32(_mm256_set1_epi32(int(blk - base)),
                                          pair ? _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1)
                                               : _mm256_setzero_si256());
    for (int m = 0; m < MT; ++m)
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[m]), _mm256_permutevar8x32_ps(f[m], pick),
                               acc[m]);
  }
}

#ifdef KVYARD_AVX512
// ---- AVX-512 VNNI: the planar legacy formats -------------------------------------------------
//
// The AVX2 planar kernel's plan (groups of G blocks, one fma per group and activation row for
// sum_blk f_blk * dot_blk, one for the min/offset term; group_scales and halves are shared) with
// 512-bit integer work: a pair of blocks is one widening load and two vpdpwssd per activation
// row (the activations in the SPLIT order), Q8_0 one widening load and one vpdpwssd per block.
// The int16 activations and so the exact int32 block dots are the AVX2 kernel's; only the float
// sums' order differs.

// The int32 partials of the pair (blk, blk + 1) with each activation row: lanes 0-7 blk's,
// lanes 8-15 blk + 1's. |partial| <= 4 * 31 * 32767 (nibbles) or 2 * 128 * 32767 (Q8_0).
template <class P, int MT>
[[gnu::always_inline]] inline void pair_dots512(const uint8_t* row, int64_t blk, int64_t nb,
                                                const int16_t* const (&xq)[MT], __m512i (&out)[MT]) {
  const __m512i zero = _mm512_setzero_si512();
  auto x_at = [&](int m, int k) { return _mm512_loadu_si512(xq[m] + blk * 32 + k * 32); };
  if constexpr (P::SIGNED_BYTES) {   // [a 0-3 | b 0-3] + [a 4-7 | b 4-7] of the 128-bit lanes
    const __m512i wa = _mm512_cvtepi8_epi16(load32(P::qs(row, blk)));
    const __m512i wb = _mm512_cvtepi8_epi16(load32(P::qs(row, blk + 1)));
    for (int m = 0; m < MT; ++m) {
      const __m512i t = _mm512_dpwssd_epi32(zero, wa, x_at(m, 0));
      const __m512i u = _mm512_dpwssd_epi32(zero, wb, x_at(m, 1));
      out[m] = _mm512_add_epi32(_mm512_shuffle_i64x2(t, u, 0x44), _mm512_shuffle_i64x2(t, u, 0xEE));
    }
  } else {
    __m512i lo, hi;
    unpack_split<P>(row, blk, nb, lo, hi);
    for (int m = 0; m < MT; ++m)
      out[m] = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(zero, lo, x_at(m, 0)), hi, x_at(m, 1));
  }
}

// Four pairs' partials (p3 zero for groups of 6) -> one int32 per block, in the order
// [g g+2 g+4 g+6 | g+1 g+3 g+5 g+7] (the AVX2 pairs' order: pair_order below).
inline __m256i group_sums512(__m512i p0, __m512i p1, __m512i p2, __m512i p3) {
  // per 128-bit lane [p0 p1 p0 p1], [p2 p3 p2 p3], then [p0 p1 p2 p3]
  const __m512i t01 = _mm512_add_epi32(_mm512_unpacklo_epi32(p0, p1), _mm512_unpackhi_epi32(p0, p1));
  const __m512i t23 = _mm512_add_epi32(_mm512_unpacklo_epi32(p2, p3), _mm512_unpackhi_epi32(p2, p3));
  const __m512i q = _mm512_add_epi32(_mm512_unpacklo_epi64(t01, t23), _mm512_unpackhi_epi64(t01, t23));
  // 128-bit lanes 0 and 1 hold the pairs' first blocks, 2 and 3 their second ones
  const __m512i r = _mm512_add_epi32(_mm512_shuffle_i32x4(q, q, _MM_SHUFFLE(3, 3, 2, 0)),
                                     _mm512_shuffle_i32x4(q, q, _MM_SHUFFLE(3, 3, 3, 1)));
  return _mm512_castsi512_si256(r);
}

// Exact int32 dot of block blk (a lone one: an odd last nibble block, or a Q8_0 block) with the
// activations at x (element order).
template <class P>
inline int32_t block_dot512(const uint8_t* row, int64_t blk, int64_t nb, const int16_t* x) {
  if constexpr (P::SIGNED_BYTES) {
    const __m512i w = _mm512_cvtepi8_epi16(load32(P::qs(row, blk)));
    return _mm512_reduce_add_epi32(_mm512_dpwssd_epi32(_mm512_setzero_si512(), w, _mm512_loadu_si512(x)));
  } else {
    const __m256i q = _mm256_cvtepu8_epi16(load16(P::qs(row, blk)));
    __m256i lo = _mm256_and_si256(q, _mm256_set1_epi16(15)), hi = _mm256_srli_epi16(q, 4);
    if constexpr (P::QH_FIELD >= 0) {
      uint16_t ql, qh;
      std::memcpy(&ql, P::field(row, nb, P::QH_FIELD) + blk * 2, 2);
      std::memcpy(&qh, P::field(row, nb, P::QH_FIELD + 1) + blk * 2, 2);
      lo = _mm256_mask_add_epi16(lo, __mmask16(ql), lo, _mm256_set1_epi16(16));
      hi = _mm256_mask_add_epi16(hi, __mmask16(qh), hi, _mm256_set1_epi16(16));
    }
    const __m256i s = _mm256_dpwssd_epi32(
        _mm256_dpwssd_epi32(_mm256_setzero_si256(), lo, _mm256_loadu_si256((const __m256i*)x)), hi,
        _mm256_loadu_si256((const __m256i*)(x + 16)));
    return _mm512_reduce_add_epi32(_mm512_zextsi256_si512(s));
  }
}

// The blocks [from, nb) after the last whole group, one at a time (rare shapes: nb % 8 and
// nb % 6 both nonzero): y[m] += dot * d_w * d_x + (m_w - OFFSET * d_w) * sum(x).
template <class P, int MT>
[[gnu::noinline]] void tail_rows512(const uint8_t* row, int64_t from, int64_t nb,
                                    const int16_t* const (&xq)[MT], const float* const (&dx)[MT],
                                    const float* const (&xs)[MT], float (&y)[MT]) {
  for (int64_t blk = from; blk < nb; ++blk) {
    const float d = half_at(P::field(row, nb, 0) + blk * 2);
    const float mw = P::MIN_FIELD >= 0 ? half_at(P::field(row, nb, std::max(P::MIN_FIELD, 0)) + blk * 2) : 0.f;
    const float shift = mw - float(P::OFFSET) * d;
    const bool paired = !P::SIGNED_BYTES && blk < nb / 2 * 2;   // in a pair: SPLIT order
    for (int m = 0; m < MT; ++m) {
      int32_t dot;
      if (paired) {
        alignas(64) int16_t x[32];   // the block's activations back in element order
        const int16_t* base = xq[m] + (blk & ~int64_t(1)) * 32 + (blk & 1) * 16;
        std::memcpy(x, base, 32);
        std::memcpy(x + 16, base + 32, 32);
        dot = block_dot512<P>(row, blk, nb, x);
      } else {
        dot = block_dot512<P>(row, blk, nb, xq[m] + blk * 32);
      }
      y[m] += float(dot) * (d * dx[m][blk]) + shift * xs[m][blk];
    }
  }
}

// One int32 per block of the group [g, g + G) in the pairs' order (as group_dots for the nibble
// formats), from 512-bit pair dots.
template <class P, int MT, int G>
[[gnu::always_inline]] inline void group_dots512(const uint8_t* row, int64_t g, int64_t nb,
                                                 const int16_t* const (&xq)[MT], __m256i (&dots)[MT]) {
  __m512i p[4][MT];
  pair_dots512<P, MT>(row, g, nb, xq, p[0]);
  pair_dots512<P, MT>(row, g + 2, nb, xq, p[1]);
  pair_dots512<P, MT>(row, g + 4, nb, xq, p[2]);
  if constexpr (G == 8) pair_dots512<P, MT>(row, g + 6, nb, xq, p[3]);
  for (int m = 0; m < MT; ++m)
    dots[m] = group_sums512(p[0][m], p[1][m], p[2][m], G == 8 ? p[3][m] : _mm512_setzero_si512());
}
#endif

// out(m, n) for weight rows [n0, n1) and the MT activation rows from m0 (the nibble formats'
// activations PAIRED, or SPLIT for WIDE), in groups of G blocks and, for G = 8, a tail. WIDE: the
// block dots by the AVX-512 pair kernel (always in the pairs' order, Q8_0 too).
// (noinline: each instantiation gets its own register allocation; inlined into int_rows_all, the
// accumulators spill to the stack.)
template <class P, int MT, int G, bool WIDE = false>
[[gnu::noinline]] void int_rows_planar(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1,
                     const QuantizedActs& a, int64_t m0, OutTile out) {
  const int64_t nb = a.nb, full = nb / G * G;   // G = 6 only where it divides nb
  const ActRows<MT> rows(a, m0);
  const auto& xq = rows.xq;
  const auto& dx = rows.dx;
  const auto& xs = rows.xs;
  const __m256 first6 = _mm256_castsi256_ps(_mm256_setr_epi32(-1, -1, -1, -1, -1, -1, 0, 0));
  const __m256i pair_order = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    const uint8_t* d_plane = P::field(row, nb, 0);
    const uint8_t* m_plane = P::field(row, nb, std::max(P::MIN_FIELD, 0));
    __m256 acc[MT], shifted[MT];
    for (int m = 0; m < MT; ++m) acc[m] = shifted[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < full; g += G) {
      __m256 f[MT];
      group_scales<P, MT, G == 6>(halves<G>(d_plane, g, nb),
                                  P::MIN_FIELD >= 0 ? halves<G>(m_plane, g, nb) : _mm256_setzero_ps(),
                                  first6, g, dx, xs, f, shifted);
      __m256i dots[MT];
#ifdef KVYARD_AVX512
      if constexpr (WIDE) group_dots512<P, MT, G>(row, g, nb, xq, dots);
      else
#endif
        group_dots<P, MT, G>(row, g, nb, xq, dots);
      for (int m = 0; m < MT; ++m) {
        const __m256 fo = P::SIGNED_BYTES && !WIDE ? f[m] : _mm256_permutevar8x32_ps(f[m], pair_order);
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[m]), fo, acc[m]);
      }
    }
    if (!WIDE && full < nb) tail_dots<P, MT>(row, nb, xq, dx, xs, acc, shifted);
    float y[MT];
    for (int m = 0; m < MT; ++m) y[m] = hsum(_mm256_add_ps(acc[m], shifted[m]));
#ifdef KVYARD_AVX512
    if (WIDE && full < nb) tail_rows512<P, MT>(row, full, nb, xq, dx, xs, y);
#endif
    for (int m = 0; m < MT; ++m) out(m0 + m, n) = y[m];
  }
}

// The row range [n0, n1) for every activation row, in tiles of up to 4 rows; the AVX2 planar
// kernel takes tiles of 2 or 3 (with 4 its accumulators spill: M = 4 as 2 + 2 measured ~7%
// faster), the WIDE one (32 zmm registers) up to 4.
template <class F, bool WIDE = false>
void int_rows_simd(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1,
                   const QuantizedActs& a, OutTile out) {
  for (int64_t m0 = 0, mt; m0 < a.M; m0 += mt) {
    const int64_t left = a.M - m0;
    mt = !is_planar<F> || WIDE ? std::min<int64_t>(4, left) : left == 3 ? 3 : std::min<int64_t>(2, left);
    auto run = [&]<int MT>() {
      if constexpr (is_planar<F>) {   // groups of 6 where they divide a row and 8 do not
        if (a.nb % 8 != 0 && a.nb % 6 == 0)
          int_rows_planar<F, MT, 6, WIDE>(w, row_bytes, n0, n1, a, m0, out);
        else
          int_rows_planar<F, MT, 8, WIDE>(w, row_bytes, n0, n1, a, m0, out);
      }
      else
        int_rows<F, MT>(w, row_bytes, n0, n1, a, m0, out);
    };
    if (mt == 1) run.template operator()<1>();
    else if (mt == 2) run.template operator()<2>();
    else if (mt == 3) run.template operator()<3>();
    else run.template operator()<4>();
  }
}
#endif

// Portable kernel: each weight row decoded to int16 once, then dotted with every activation row
// (activations in element order).
template <class F>
void int_rows_portable(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1,
                       const QuantizedActs& a, OutTile out) {
  constexpr int PER = F::QK / F::SUB;
  const int64_t K = a.K, subs = K / F::SUB;
  const float* xsum = F::SUB == 16 ? a.sum16 : a.sum32;
  std::vector<int16_t> q(K);
  std::vector<float> scale(subs), min(subs);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    for (int64_t blk = 0; blk < K / F::QK; ++blk) {
      F::values(row, blk, K / F::QK, q.data() + blk * F::QK);
      F::scales(row, blk, K / F::QK, scale.data() + blk * PER, min.data() + blk * PER);
    }
    for (int64_t m = 0; m < a.M; ++m) {
      const int16_t* x = a.q + m * K;
      const float* dx = a.d + m * a.nbp;
      const float* xs = xsum + m * a.nbp * (32 / F::SUB);
      float y = 0.f;
      for (int64_t s = 0; s < subs; ++s) {
        int32_t p = 0;
        for (int i = 0; i < F::SUB; ++i)
          p += int32_t(q[s * F::SUB + i]) * int32_t(x[s * F::SUB + i]);
        y += float(p) * scale[s] * dx[s * F::SUB / 32] + min[s] * xs[s];
      }
      out(m, n) = y;
    }
  }
}

// ---- row-interleaved tiles (X16, gguf_formats.h) ---------------------------------------------

#ifdef KVYARD_AVX512
// out(m0 + m, n0 + r) for the 16 rows of one tile and MT activation rows (element order): per
// block, int32 lane r sums row r's products (exact), then one fma per block and activation row
// scales the 16 lanes at once: y += dot * (d_w * d_x) + (m_w - OFFSET * d_w) * sum(x).
template <class X, int MT>
[[gnu::noinline]] void x16_tile512(const uint8_t* tile, const QuantizedActs& a, int64_t m0,
                                   const OutTile& out, int64_t n0) {
  const ActRows<MT> rows(a, m0);
  const auto& xq = rows.xq;
  const auto& dx = rows.dx;
  const auto& xs = rows.xs;
  auto pair_at = [](const int16_t* x) { return _mm512_set1_epi32(int(u32_at((const uint8_t*)x))); };
  __m512 acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t blk = 0; blk < a.nb; ++blk) {
    const uint8_t* b = X::block_at(tile, blk);
    __m512i s0[MT], s1[MT];   // two chains per row: lo / hi nibbles, or even / odd units
    for (int m = 0; m < MT; ++m) s0[m] = s1[m] = _mm512_setzero_si512();
    if constexpr (!X::SIGNED_BYTES) {
#pragma GCC unroll 8
      for (int c = 0; c < 8; ++c) {   // unit c: elements 2c, 2c + 1 (low nibbles), 2c + 16, 2c + 17
        const __m512i w = _mm512_cvtepu8_epi16(load32(b + 32 * c));
        const __m512i lo = _mm512_and_si512(w, _mm512_set1_epi16(15)), hi = _mm512_srli_epi16(w, 4);
        for (int m = 0; m < MT; ++m) {
          s0[m] = _mm512_dpwssd_epi32(s0[m], lo, pair_at(xq[m] + blk * 32 + 2 * c));
          s1[m] = _mm512_dpwssd_epi32(s1[m], hi, pair_at(xq[m] + blk * 32 + 16 + 2 * c));
        }
      }
    } else {
#pragma GCC unroll 16
      for (int u = 0; u < 16; ++u) {   // unit u: elements 2u, 2u + 1
        const __m512i w = _mm512_cvtepi8_epi16(load32(b + 32 * u));
        for (int m = 0; m < MT; ++m) {
          __m512i& s = u % 2 ? s1[m] : s0[m];
          s = _mm512_dpwssd_epi32(s, w, pair_at(xq[m] + blk * 32 + 2 * u));
        }
      }
    }
    const __m512 d16 = _mm512_cvtph_ps(load32(X::field(b, 0)));
    __m512 shift = _mm512_setzero_ps();
    if constexpr (X::HAS_MIN) shift = _mm512_cvtph_ps(load32(X::field(b, 1)));
    if constexpr (X::OFFSET != 0) shift = _mm512_mul_ps(_mm512_set1_ps(-float(X::OFFSET)), d16);
    for (int m = 0; m < MT; ++m) {
      const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(s0[m], s1[m]));
      acc[m] = _mm512_fmadd_ps(dot, _mm512_mul_ps(d16, _mm512_set1_ps(dx[m][blk])), acc[m]);
      if constexpr (X::HAS_MIN || X::OFFSET != 0)
        acc[m] = _mm512_fmadd_ps(shift, _mm512_set1_ps(xs[m][blk]), acc[m]);
    }
  }
  for (int m = 0; m < MT; ++m) _mm512_storeu_ps(&out(m0 + m, n0), acc[m]);
}
#endif

// The same for any SIMD level: each row's blocks reassembled as the file has them and dotted
// like the portable kernel (the path where the level was lowered after the weights were laid out).
template <class X>
void x16_tile_portable(const uint8_t* tile, const QuantizedActs& a, const OutTile& out, int64_t n0) {
  using F = typename X::File;
  uint8_t block[F::BYTES];
  int16_t q[32];
  float scale, min;
  for (int r = 0; r < X16_ROWS; ++r) {
    for (int64_t m = 0; m < a.M; ++m) out(m, n0 + r) = 0.f;
    for (int64_t blk = 0; blk < a.nb; ++blk) {
      X::native_block(tile, r, blk, block);
      F::values(block, 0, 1, q);
      F::scales(block, 0, 1, &scale, &min);
      for (int64_t m = 0; m < a.M; ++m) {
        const int16_t* x = a.q + m * a.K + blk * 32;
        int32_t p = 0;
        for (int i = 0; i < 32; ++i) p += int32_t(q[i]) * int32_t(x[i]);
        out(m, n0 + r) += float(p) * scale * a.d[m * a.nbp + blk] + min * a.sum32[m * a.nbp + blk];
      }
    }
  }
}

// One whole tile (rows [n0, n0 + 16)) for every activation row, in row tiles of up to 4.
template <class X>
void x16_tile_at(int64_t level, const uint8_t* tile, const QuantizedActs& a, const OutTile& out,
                 int64_t n0) {
#ifdef KVYARD_AVX512
  if (level == AVX512) {
    for (int64_t m0 = 0, mt; m0 < a.M; m0 += mt) {
      mt = std::min<int64_t>(4, a.M - m0);
      if (mt == 1) x16_tile512<X, 1>(tile, a, m0, out, n0);
      else if (mt == 2) x16_tile512<X, 2>(tile, a, m0, out, n0);
      else if (mt == 3) x16_tile512<X, 3>(tile, a, m0, out, n0);
      else x16_tile512<X, 4>(tile, a, m0, out, n0);
    }
    return;
  }
#endif
  x16_tile_portable<X>(tile, a, out, n0);
}

// The kernel of `level` (the activations quantized in act_layout<F>(level)).
template <class F>
void int_rows_at(int64_t level, const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1,
                 const QuantizedActs& a, OutTile out) {
#ifdef KVYARD_AVX512
  if constexpr (is_planar<F>)
    if (level == AVX512) return int_rows_simd<F, true>(w, row_bytes, n0, n1, a, out);
#endif
#ifdef KVYARD_AVX2
  if (level >= AVX2) return int_rows_simd<F>(w, row_bytes, n0, n1, a, out);
#endif
  int_rows_portable<F>(w, row_bytes, n0, n1, a, out);
}

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

// ---- X16 dequantization ---------------------------------------------------------------------

// Row r of tile at `tile`, dequantized into out[k * ld] (k = 0..K-1), bit for bit as gguf.quants.
template <class X, class T>
void dequant_x16_row(const uint8_t* tile, int r, int64_t nb, T* out, int64_t ld) {
  using F = typename X::File;
  uint8_t block[F::BYTES];
  int16_t q[32];
  float scale, min;
  for (int64_t blk = 0; blk < nb; ++blk) {
    X::native_block(tile, r, blk, block);
    F::values(block, 0, 1, q);
    F::scales(block, 0, 1, &scale, &min);
    for (int e = 0; e < 32; ++e) {
      const float v = float(q[e]) * scale;
      out[(blk * 32 + e) * ld] = T(F::HAS_MIN ? v + min : v);
    }
  }
}

#ifdef KVYARD_AVX512
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(c10::BFloat16* p, __m512 v) {   // nearest even (finite weights: no NaN case)
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(r));
}

// A whole tile dequantized K-major: out[k * ld + r] for its 16 rows r. A unit load's lanes
// (2r + j) are put in the order [j = 0: rows 0-15 | j = 1: rows 0-15], i.e. two output rows.
template <class X, class T>
void dequant_x16_tile512(const uint8_t* tile, int64_t nb, T* out, int64_t ld) {
  const __m512i by_element = _mm512_set_epi16(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1,
                                              30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  for (int64_t blk = 0; blk < nb; ++blk) {
    const uint8_t* b = X::block_at(tile, blk);
    const __m512 d16 = _mm512_cvtph_ps(load32(X::field(b, 0)));
    const __m512 m16 = X::HAS_MIN ? _mm512_cvtph_ps(load32(X::field(b, 1))) : _mm512_setzero_ps();
    auto emit = [&](__m512i v, int64_t e) {   // v: lanes (2r + j) = row r, element e + j
      v = _mm512_permutexvar_epi16(by_element, v);
      for (int j = 0; j < 2; ++j) {
        const __m256i h = j ? _mm512_extracti64x4_epi64(v, 1) : _mm512_castsi512_si256(v);
        __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(h)), d16);   // mul, then add
        if constexpr (X::HAS_MIN) f = _mm512_add_ps(f, m16);
        store16(out + (blk * 32 + e + j) * ld, f);
      }
    };
    if constexpr (!X::SIGNED_BYTES) {
      for (int c = 0; c < 8; ++c) {
        const __m512i w = _mm512_cvtepu8_epi16(load32(b + 32 * c)), off = _mm512_set1_epi16(X::OFFSET);
        emit(_mm512_sub_epi16(_mm512_and_si512(w, _mm512_set1_epi16(15)), off), 2 * c);
        emit(_mm512_sub_epi16(_mm512_srli_epi16(w, 4), off), 16 + 2 * c);
      }
    } else {
      for (int u = 0; u < 16; ++u) emit(_mm512_cvtepi8_epi16(load32(b + 32 * u)), 2 * u);
    }
  }
}
#endif

// Rows [n0, n1) of an X16 weight (n0 a multiple of 16) dequantized K-major: out[k * ld + n - n0].
// Rows of whole tiles (below N / 16 * 16) are X16, the rest planar.
template <class X, class T>
void dequant_x16_kmajor(const uint8_t* w, int64_t row_bytes, int64_t N, int64_t n0, int64_t n1, int64_t K,
                        T* out, int64_t ld) {
  using P = typename X::Tail;
  const int64_t nb = K / 32, full = N / X16_ROWS * X16_ROWS;
  for (int64_t g = n0; g < n1; g += X16_ROWS) {
    if (g + X16_ROWS <= full && g + X16_ROWS <= n1) {
#ifdef KVYARD_AVX512
      dequant_x16_tile512<X>(w + g * row_bytes, nb, out + (g - n0), ld);
#else
      for (int r = 0; r < X16_ROWS; ++r) dequant_x16_row<X>(w + g * row_bytes, r, nb, out + (g - n0) + r, ld);
#endif
      continue;
    }
    std::vector<float> row(K);
    for (int64_t n = g; n < std::min(g + X16_ROWS, n1); ++n) {
      if (n < full) {
        dequant_x16_row<X>(w + (n / X16_ROWS) * X16_ROWS * row_bytes, int(n % X16_ROWS), nb, out + (n - n0), ld);
      } else {
        dequant_rows<P>(w, row_bytes, n, n + 1, K, row.data());
        for (int64_t k = 0; k < K; ++k) out[k * ld + (n - n0)] = T(row[k]);
      }
    }
  }
}

template <class F>
void check_weight(const at::Tensor& w, int64_t K) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte && w.dim() == 2 &&
                  w.is_contiguous(),
              "kvyard_gguf: weight must be a contiguous CPU uint8 tensor [rows, bytes_per_row]");
  TORCH_CHECK(K % F::QK == 0 && w.size(1) == K / F::QK * F::BYTES, "kvyard_gguf: in_features ",
              K, " does not match ", w.size(1), " bytes per row of ", F::QK, "-element blocks");
}

at::Tensor finish(at::Tensor out, const std::optional<at::Tensor>& bias, at::ScalarType dtype) {
  if (bias.has_value()) out.add_(bias->to(at::kFloat));
  return out.to(dtype);
}

// Rows per parallel task: enough work per task to hide the pool's fork/join.
int64_t row_grain(int64_t K, int64_t M) {
  return std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, K * M));
}

inline void store(float* p, float v) { *p = v; }
inline void store(c10::BFloat16* p, float v) { *p = c10::BFloat16(v); }   // nearest even, as .to()

// out[m, n] = tile(m, n) + bias[n] for n in [n0, n1), in the output's dtype (rows ld apart).
template <class T>
void store_rows(const OutTile& tile, int64_t M, int64_t n0, int64_t n1, const float* bias, T* out,
                int64_t ld) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = n0; n < n1; ++n) store(out + m * ld + n, tile(m, n) + (bias ? bias[n] : 0.f));
}

// A task's float results for 16 weight rows: on the stack for decode-sized M.
struct TileBuffer {
  alignas(64) float stack[16 * 16];
  std::vector<float> heap;
  float* data;
  explicit TileBuffer(int64_t M) : data(stack) {
    if (M > 16) data = (heap.resize(M * 16), heap.data());
  }
};

// One weight as the int kernel multiplies it (qtype a layout id, checked by check_int_weight).
struct IntWeight {
  const uint8_t* w;
  int64_t qtype, K, N, row_bytes;
  const float* bias;   // float32 [N] or null
};

void check_int_weight(const at::Tensor& w, int64_t qtype, int64_t K) {
  if (!dispatch_x16(qtype, [&](auto fmt) { check_weight<typename decltype(fmt)::Tail>(w, K); }))
    dispatch(qtype, [&](auto fmt) { check_weight<decltype(fmt)>(w, K); });
}

// The order the activations must be quantized in for this weight at SIMD level `level`.
ActLayout int_act_layout(int64_t qtype, int64_t level) {
  ActLayout layout = ActLayout::ELEMENT;
  if (!dispatch_x16(qtype, [](auto) {}))
    dispatch(qtype, [&](auto fmt) { layout = act_layout<decltype(fmt)>(level); });
  return layout;
}

// y[:, g0:g1] for activations quantized in int_act_layout(W.qtype, level); g0 a multiple of 16.
// Groups of 16 weight rows (an X16 tile, or 16 rows that stay in L1 while every activation tile
// passes over them) go through a float tile. mm_int's tasks and the native linear's rows both
// run this, so they agree bit for bit.
template <class T>
void int_tiles(const IntWeight& W, const QuantizedActs& acts, int64_t level, int64_t g0, int64_t g1,
               T* y, int64_t ldy) {
  TileBuffer buf(acts.M);
  const bool x16 = dispatch_x16(W.qtype, [&](auto fmt) {
    using X = decltype(fmt);
    using P = typename X::Tail;
    for (int64_t g = g0; g < g1; g += 16) {
      const int64_t e = std::min(g + 16, g1);
      const OutTile tile{buf.data, 16, g};
      if (e - g == X16_ROWS) x16_tile_at<X>(level, W.w + g * W.row_bytes, acts, tile, g);
      else int_rows_portable<P>(W.w, W.row_bytes, g, e, acts, tile);   // the planar last rows
      store_rows(tile, acts.M, g, e, W.bias, y, ldy);
    }
  });
  if (!x16)
    dispatch(W.qtype, [&](auto fmt) {
      using F = decltype(fmt);
      for (int64_t g = g0; g < g1; g += 16) {
        const int64_t e = std::min(g + 16, g1);
        const OutTile tile{buf.data, 16, g};
        int_rows_at<F>(level, W.w, W.row_bytes, g, e, acts, tile);
        store_rows(tile, acts.M, g, e, W.bias, y, ldy);
      }
    });
}

// x [M, K] float32 or bfloat16 is read as it is and y [M, N] written in its dtype (other dtypes
// go through float32). Weight rows are split over the threads in groups of 16 (int_tiles).
at::Tensor mm_int(const at::Tensor& x, const at::Tensor& w, int64_t qtype, int64_t K,
                  const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.size(1) == K,
              "kvyard_gguf: x must be a CPU tensor [M, ", K, "]");
  check_int_weight(w, qtype, K);
  const at::ScalarType dtype = x.scalar_type();
  const bool direct = dtype == at::kFloat || dtype == at::kBFloat16;
  const at::Tensor xc = direct ? x.contiguous() : x.to(at::kFloat).contiguous();
  const int64_t M = xc.size(0), N = w.size(0);
  at::Tensor out = at::empty({M, N}, xc.options());
  const at::Tensor bias32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const IntWeight W{w.data_ptr<uint8_t>(), qtype, K, N, w.size(1),
                    bias32.defined() ? bias32.data_ptr<float>() : nullptr};
  const int64_t level = simd_level();
  const ActLayout layout = int_act_layout(qtype, level);
  const bool bf16 = xc.scalar_type() == at::kBFloat16;
  const QuantizedActs& acts = bf16 ? quantize_acts(xc.data_ptr<c10::BFloat16>(), M, K, layout)
                                   : quantize_acts(xc.data_ptr<float>(), M, K, layout);
  const int64_t grain16 = std::max<int64_t>(1, row_grain(K, M) / 16);
  at::parallel_for(0, (N + 15) / 16, grain16, [&](int64_t t0, int64_t t1) {
    const int64_t g0 = t0 * 16, g1 = std::min(t1 * 16, N);
    if (bf16) int_tiles(W, acts, level, g0, g1, out.data_ptr<c10::BFloat16>(), N);
    else int_tiles(W, acts, level, g0, g1, out.data_ptr<float>(), N);
  });
  return direct ? out : out.to(dtype);
}

// ---- the native linear (kvyard_native.h) ------------------------------------------------------
//
// mm_int without the dispatcher, for the C++ decode step: prepare quantizes x into the caller's
// scratch exactly as mm_int does (quantize_into, the layout of the SIMD level read then, stored
// in the scratch), rows runs int_tiles on a range of whole 16-row groups.

struct NativeLinear {
  kvyard_native_linear desc;   // first: the descriptor's address is the tensor's
  IntWeight weight;
  bool bf16;
};

struct NativeScratch {   // followed by the activations, 64-byte aligned
  int64_t level, M;
  alignas(64) uint8_t acts[];
};

QuantizedActs native_acts(const NativeLinear& L, void* scratch, int64_t M) {
  return bind_acts(static_cast<NativeScratch*>(scratch)->acts, M, L.weight.K);
}

int64_t native_scratch_bytes(const void* ctx, int64_t M) {
  return int64_t(sizeof(NativeScratch)) + acts_bytes(M, static_cast<const NativeLinear*>(ctx)->weight.K);
}

void native_prepare(const void* ctx, const void* x, int64_t ldx, int64_t M, void* scratch) {
  const auto& L = *static_cast<const NativeLinear*>(ctx);
  auto* head = static_cast<NativeScratch*>(scratch);
  head->level = simd_level();
  head->M = M;
  QuantizedActs acts = native_acts(L, scratch, M);
  const ActLayout layout = int_act_layout(L.weight.qtype, head->level);
  if (L.bf16) quantize_into(static_cast<const c10::BFloat16*>(x), ldx, acts, layout);
  else quantize_into(static_cast<const float*>(x), ldx, acts, layout);
}

void native_rows(const void* ctx, const void* scratch, int64_t M, void* y, int64_t ldy, int64_t r0,
                 int64_t r1) {
  const auto& L = *static_cast<const NativeLinear*>(ctx);
  auto* head = static_cast<NativeScratch*>(const_cast<void*>(scratch));
  const QuantizedActs acts = native_acts(L, head, M);
  if (L.bf16) int_tiles(L.weight, acts, head->level, r0, r1, static_cast<c10::BFloat16*>(y), ldy);
  else int_tiles(L.weight, acts, head->level, r0, r1, static_cast<float*>(y), ldy);
}

// (descriptor bytes, float32 bias or empty): both, and w, must outlive every use of the descriptor.
std::tuple<at::Tensor, at::Tensor> native_linear(const at::Tensor& w, int64_t qtype, int64_t K,
                                                 const std::optional<at::Tensor>& bias, at::ScalarType dtype,
                                                 int64_t max_rows) {
  check_int_weight(w, qtype, K);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "kvyard_gguf.native_linear: float32 or bfloat16 expected");
  const int64_t N = w.size(0);
  at::Tensor bias32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::empty({0}, at::kFloat);
  TORCH_CHECK(!bias.has_value() || bias32.numel() == N, "kvyard_gguf.native_linear: bias must have ", N, " values");
  at::Tensor bytes = at::empty({int64_t(sizeof(NativeLinear))}, at::kByte);
  auto* L = new (bytes.data_ptr()) NativeLinear{};
  L->weight = IntWeight{w.data_ptr<uint8_t>(), qtype, K, N, w.size(1), bias.has_value() ? bias32.data_ptr<float>() : nullptr};
  L->bf16 = dtype == at::kBFloat16;
  L->desc = kvyard_native_linear{KVYARD_NATIVE_ABI, L, L->bf16 ? KVYARD_NATIVE_BF16 : KVYARD_NATIVE_F32, N, K, 16,
                                 max_rows, &native_scratch_bytes, &native_prepare, &native_rows};
  return {bytes, bias32};
}

// ---- the dense path -------------------------------------------------------------------------
//
// out [M, N] float32 in blocks of DENSE_BN weight rows, one parallel task each: the task
// dequantizes its rows K-major into its tile ([K, DENSE_BN]; bfloat16 pairs of K interleaved,
// [K/2, DENSE_BN, 2], where the gemm is bf16), then runs one brgemm micro-kernel call over the whole
// K per DENSE_BM activation rows. Invariant: an output value's summation order depends on the
// shapes (M, N, K) alone, never on the thread count nor on which thread runs its block. A library
// gemm (oneDNN, MKL) picks its blocking, a split of K among them, from the threads it sees, even
// when it runs single-threaded inside a parallel region: its bf16 results moved by an ulp between
// 1 and 2 threads, and greedy tokens with them. The micro-kernel (oneDNN's, through
// at::native::cpublas) has no threads of its own; where it is missing (not x86, oneDNN switched
// off), each block is one ATen gemm instead, as deterministic as that library.
constexpr int64_t DENSE_BN = 64, DENSE_BM = 32;

// Whether at::native::cpublas::brgemm runs oneDNN's micro-kernel for this gemm dtype here; it
// needs oneDNN switched on (torch.backends.mkldnn). float32: from AVX2 on (below it cpublas calls
// the BLAS gemm). bfloat16 in VNNI pairs: from AVX-512 on, found by one small call at first use
// (cpublas raises where that micro-kernel is missing, e.g. oneDNN capped to an older ISA).
bool dense_ukernel(bool bf16_gemm) {
  if (!at::globalContext().userEnabledMkldnn()) return false;
#ifdef KVYARD_AVX2
  if (!bf16_gemm) return true;
  static const bool bf16 = [] {
    std::vector<c10::BFloat16> a(2 * 32), b(32 * 16);
    std::vector<float> c(2 * 16);
    try {
      at::native::cpublas::brgemm(2, 16, 32, 32, 16, 16, false, a.data(), b.data(), c.data(), true);
      at::native::cpublas::brgemm_release(true);
      return true;
    } catch (const std::exception&) {   // c10::Error, or oneDNN's when it generates no kernel
      return false;
    }
  }();
  return bf16;
#else
  (void)bf16_gemm;
  return false;
#endif
}

// Rows [n0, n0 + rows) of w dequantized K-major into kmajor[k * DENSE_BN + r].
template <class T>
void dense_block_kmajor(const at::Tensor& w, int64_t qtype, int64_t K, int64_t n0, int64_t rows, T* kmajor,
                        std::vector<T>& row_major) {
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const int64_t N = w.size(0), row_bytes = w.size(1);
  const bool x16 = dispatch_x16(qtype, [&](auto fmt) {
    dequant_x16_kmajor<decltype(fmt)>(wp, row_bytes, N, n0, n0 + rows, K, kmajor, DENSE_BN);
  });
  if (x16) return;
  row_major.resize(rows * K);
  dispatch(qtype, [&](auto fmt) { dequant_rows<decltype(fmt)>(wp, row_bytes, n0, n0 + rows, K, row_major.data()); });
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < K; ++k) kmajor[k * DENSE_BN + r] = row_major[r * K + k];
}

// [K, DENSE_BN] -> [K/2, DENSE_BN, 2]: the pairs of K next to each other (the bf16 micro-kernel's B).
void to_vnni(const c10::BFloat16* kmajor, int64_t K, c10::BFloat16* vnni) {
#ifdef KVYARD_AVX512
  static_assert(DENSE_BN % 32 == 0);
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37, 5,
                                      36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int64_t k = 0; k < K; k += 2)
    for (int64_t r = 0; r < DENSE_BN; r += 32) {   // 32 columns of rows k and k + 1 -> 64 pairs
      const __m512i a = _mm512_loadu_si512(kmajor + k * DENSE_BN + r);
      const __m512i b = _mm512_loadu_si512(kmajor + (k + 1) * DENSE_BN + r);
      _mm512_storeu_si512(vnni + k * DENSE_BN + 2 * r, _mm512_permutex2var_epi16(a, lo, b));
      _mm512_storeu_si512(vnni + k * DENSE_BN + 2 * r + 32, _mm512_permutex2var_epi16(a, hi, b));
    }
#else
  for (int64_t k = 0; k < K; k += 2)
    for (int64_t r = 0; r < DENSE_BN; ++r) {
      vnni[k * DENSE_BN + 2 * r] = kmajor[k * DENSE_BN + r];
      vnni[k * DENSE_BN + 2 * r + 1] = kmajor[(k + 1) * DENSE_BN + r];
    }
#endif
}

// out[:, n0 : n0 + rows] = xg @ B, B the block's dequantized rows (see above).
template <class T>
void dense_block(const at::Tensor& xg, const at::Tensor& w, int64_t qtype, int64_t n0, int64_t rows, bool ukernel,
                 std::vector<T>& kmajor, std::vector<T>& vnni, std::vector<T>& row_major, at::Tensor& out) {
  const int64_t M = xg.size(0), K = xg.size(1), N = out.size(1);
  dense_block_kmajor<T>(w, qtype, K, n0, rows, kmajor.data(), row_major);
  float* y = out.data_ptr<float>() + n0;
  if (!ukernel) {
    const at::Tensor b = at::from_blob(kmajor.data(), {K, rows}, {DENSE_BN, 1}, xg.options());
    out.narrow(1, n0, rows).copy_(at::mm(xg, b));
    return;
  }
  const T* x = xg.data_ptr<T>();
  const T* b = kmajor.data();
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    to_vnni(kmajor.data(), K, vnni.data());
    b = vnni.data();
  }
  constexpr bool is_vnni = std::is_same_v<T, c10::BFloat16>;
  for (int64_t m0 = 0; m0 < M; m0 += DENSE_BM)
    at::native::cpublas::brgemm(std::min(DENSE_BM, M - m0), rows, K, K, DENSE_BN, N, false, x + m0 * K, b,
                                y + m0 * N, is_vnni);
}

at::Tensor mm_dense(const at::Tensor& x, const at::Tensor& w, int64_t qtype, int64_t K,
                    const std::optional<at::Tensor>& bias, bool bf16_gemm) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.size(1) == K,
              "kvyard_gguf: x must be a CPU tensor [M, ", K, "]");
  check_int_weight(w, qtype, K);
  const at::Tensor xg = x.to(bf16_gemm ? at::kBFloat16 : at::kFloat).contiguous();
  const int64_t N = w.size(0);
  const bool ukernel = dense_ukernel(bf16_gemm);
  at::Tensor out = at::empty({xg.size(0), N}, x.options().dtype(at::kFloat));
  // The pool's threads do not inherit the caller's inference mode; the fallback's tensor ops
  // (an in-place copy into `out`, an inference tensor under torch.inference_mode) need it.
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, (N + DENSE_BN - 1) / DENSE_BN, 1, [&](int64_t b0, int64_t b1) {
    at::ThreadLocalStateGuard state_guard(caller_state);
    auto run = [&](auto tag) {
      using T = decltype(tag);
      std::vector<T> kmajor(K * DENSE_BN), vnni(ukernel && bf16_gemm ? K * DENSE_BN : 0), row_major;
      for (int64_t blk = b0; blk < b1; ++blk)
        dense_block<T>(xg, w, qtype, blk * DENSE_BN, std::min(DENSE_BN, N - blk * DENSE_BN), ukernel, kmajor, vnni,
                       row_major, out);
    };
    if (bf16_gemm) run(c10::BFloat16{});
    else run(float{});
    if (ukernel) at::native::cpublas::brgemm_release(bf16_gemm);
  });
  return finish(out, bias, x.scalar_type());
}

// [N, K] in dtype: written directly for float32 and bfloat16, converted from float32 otherwise.
at::Tensor dequantize(const at::Tensor& w, int64_t qtype, int64_t K, at::ScalarType dtype) {
  const int64_t N = w.size(0);
  const bool bf16 = dtype == at::kBFloat16;
  at::Tensor out = at::empty({N, K}, w.options().dtype(bf16 ? at::kBFloat16 : at::kFloat));
  const bool x16 = dispatch_x16(qtype, [&](auto fmt) {   // row by row: a check, not a hot path
    using X = decltype(fmt);
    check_weight<typename X::Tail>(w, K);
    at::Tensor o32 = bf16 ? at::empty({N, K}, w.options().dtype(at::kFloat)) : out;
    float* op = o32.data_ptr<float>();
    const uint8_t* wp = w.data_ptr<uint8_t>();
    const int64_t full = N / X16_ROWS * X16_ROWS;
    for (int64_t n = 0; n < N; ++n) {
      if (n < full)
        dequant_x16_row<X>(wp + (n / X16_ROWS) * X16_ROWS * w.size(1), int(n % X16_ROWS), K / 32, op + n * K, 1);
      else
        dequant_rows<typename X::Tail>(wp, w.size(1), n, n + 1, K, op + n * K);
    }
    if (bf16) out.copy_(o32);
  });
  if (!x16) dispatch(qtype, [&](auto fmt) {
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

// File layout -> X16 (whole tiles of 16 rows; the last N % 16 rows planar); see gguf_formats.h.
at::Tensor repack_x16(const at::Tensor& w, int64_t qtype, int64_t K) {
  at::Tensor out = at::empty_like(w);
  const bool done = dispatch_x16(X16_BASE + qtype, [&](auto fmt) {
    using X = decltype(fmt);
    using P = typename X::Tail;
    check_weight<P>(w, K);
    const int64_t N = w.size(0), row_bytes = w.size(1), full = N / X16_ROWS * X16_ROWS;
    const uint8_t* in = w.data_ptr<uint8_t>();
    uint8_t* o = out.data_ptr<uint8_t>();
    for (int64_t g = 0; g < full; g += X16_ROWS)
      X::repack_tile(in + g * row_bytes, row_bytes, K / 32, o + g * row_bytes);
    for (int64_t n = full; n < N; ++n) P::repack_row(in + n * row_bytes, o + n * row_bytes, K / 32);
  });
  TORCH_CHECK(done, "kvyard_gguf: no X16 layout for ggml type id ", qtype);
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
  m.def("repack_x16(Tensor w, int qtype, int in_features) -> Tensor");
  m.def("native_linear(Tensor w, int qtype, int in_features, Tensor? bias, ScalarType dtype, int max_rows)"
        " -> (Tensor, Tensor)", &kvyard_gguf::native_linear);
  m.def("native_bf16() -> bool", &kvyard_gguf::native_bf16);
  m.def("has_simd() -> bool", &kvyard_gguf::has_simd);
  m.def("simd_level() -> int", &kvyard_gguf::simd_level);
  m.def("set_simd_level(int level) -> int", &kvyard_gguf::set_simd_level);
}

TORCH_LIBRARY_IMPL(kvyard_gguf, CPU, m) {
  m.impl("mm_int", &kvyard_gguf::mm_int);
  m.impl("mm_dense", &kvyard_gguf::mm_dense);
  m.impl("dequantize", &kvyard_gguf::dequantize);
  m.impl("repack", &kvyard_gguf::repack);
  m.impl("repack_x16", &kvyard_gguf::repack_x16);
}
