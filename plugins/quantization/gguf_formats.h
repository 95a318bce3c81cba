// GGUF (ggml) block formats: how one block's bytes become integers and scales.
//
// Each format decodes a block of QK elements into
//   w[e] = q[e] * scale[e / SUB] + min[e / SUB]          (min = 0 where HAS_MIN is false)
// with integer q. Three views of the same block:
//   scales(b, scale, min)   QK/SUB floats each (scalar; once per block)
//   values(b, q)            all QK int16 values (portable C++; dequantization, fallback kernel)
//   unpack(b, c, w0, w1)    AVX2: elements [32c, 32c+16) and [32c+16, 32c+32) as int16 lanes
// The formulas follow gguf.quants (gguf-py); the tests check all three against it bit for bit.
// ID is the format's value in ggml's enum ggml_type.
#pragma once

#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define KVYARD_AVX2 1
// AVX-512 with VNNI (vpdpwssd: int16 pairs multiplied and added into int32 lanes in one
// instruction); the kernels take it where the CPU has it and the caller has not turned it off.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define KVYARD_AVX512 1
#endif
#endif

namespace kvyard_gguf {

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#ifdef KVYARD_AVX2
  return _cvtsh_ss(h);
#else
  return c10::detail::fp16_ieee_to_fp32_value(h);
#endif
}

inline uint32_t u32_at(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

#ifdef KVYARD_AVX2
inline __m128i load16(const uint8_t* p) { return _mm_loadu_si128((const __m128i*)p); }
inline __m256i load32(const uint8_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
inline __m128i nibble_lo(__m128i v) { return _mm_and_si128(v, _mm_set1_epi8(15)); }
inline __m128i nibble_hi(__m128i v) { return _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(15)); }
// (v >> shift) & mask per byte (epi16 shifts leak bits across bytes; the mask removes them).
inline __m256i bits(__m256i v, int shift, int mask) {
  return _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(shift)), _mm256_set1_epi8(char(mask)));
}
// Two runs of 16 unsigned bytes -> two vectors of 16 int16, minus OFFSET.
template <int OFFSET = 0>
inline void widen(__m128i lo, __m128i hi, __m256i& w0, __m256i& w1) {
  w0 = _mm256_cvtepu8_epi16(lo);
  w1 = _mm256_cvtepu8_epi16(hi);
  if constexpr (OFFSET != 0) {
    w0 = _mm256_sub_epi16(w0, _mm256_set1_epi16(OFFSET));
    w1 = _mm256_sub_epi16(w1, _mm256_set1_epi16(OFFSET));
  }
}
template <int OFFSET = 0>
inline void widen(__m256i v, __m256i& w0, __m256i& w1) {
  widen<OFFSET>(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1), w0, w1);
}
// Bit j of `mask16` -> lane j equals 16 (the fifth bit of a Q5 value), else 0.
inline __m256i fifth_bits(uint32_t mask16) {
  const __m256i lane_bit = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048,
                                             4096, 8192, 16384, short(-32768));
  const __m256i set = _mm256_cmpeq_epi16(
      _mm256_and_si256(_mm256_set1_epi16(short(mask16)), lane_bit), lane_bit);
  return _mm256_and_si256(set, _mm256_set1_epi16(16));
}
#endif

// out[i] = mult * float(v[i]) for 8 bytes v (unsigned, or signed with SIGNED).
template <bool SIGNED = false>
inline void scaled_bytes8(const uint8_t* v, float mult, float* __restrict__ out) {
#ifdef KVYARD_AVX2
  const __m128i b = _mm_loadl_epi64((const __m128i*)v);
  const __m256i i = SIGNED ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b);
  _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_set1_ps(mult), _mm256_cvtepi32_ps(i)));
#else
  for (int k = 0; k < 8; ++k) out[k] = mult * float(SIGNED ? int(int8_t(v[k])) : int(v[k]));
#endif
}

// ---- legacy formats: 32-element blocks, one fp16 scale (and min) -----------------------------

struct Q4_0 {  // d, qs[16]: element l is the low nibble of qs[l], l+16 the high one; w = d*(q-8)
  static constexpr int ID = 2, QK = 32, BYTES = 18, SUB = 32;
  static constexpr bool HAS_MIN = false;
  static void scales(const uint8_t* row, int64_t blk, int64_t, float* __restrict__ scale,
                     float* __restrict__ min) {
    const uint8_t* b = row + blk * BYTES;
    scale[0] = half_at(b);
    min[0] = 0.f;
  }
  static void values(const uint8_t* row, int64_t blk, int64_t, int16_t* __restrict__ q) {
    const uint8_t* __restrict__ b = row + blk * BYTES;
    for (int l = 0; l < 16; ++l) {
      q[l] = int16_t(b[2 + l] & 15) - 8;
      q[l + 16] = int16_t(b[2 + l] >> 4) - 8;
    }
  }
#ifdef KVYARD_AVX2
  static void unpack(const uint8_t* row, int64_t blk, int64_t, int, __m256i& w0, __m256i& w1) {
    const uint8_t* b = row + blk * BYTES;
    const __m128i v = load16(b + 2);
    widen<8>(nibble_lo(v), nibble_hi(v), w0, w1);
  }
#endif
};

struct Q4_1 {  // d, m, qs[16]; w = d*q + m
  static constexpr int ID = 3, QK = 32, BYTES = 20, SUB = 32;
  static constexpr bool HAS_MIN = true;
  static void scales(const uint8_t* row, int64_t blk, int64_t, float* __restrict__ scale,
                     float* __restrict__ min) {
    const uint8_t* b = row + blk * BYTES;
    scale[0] = half_at(b);
    min[0] = half_at(b + 2);
  }
  static void values(const uint8_t* row, int64_t blk, int64_t, int16_t* __restrict__ q) {
    const uint8_t* __restrict__ b = row + blk * BYTES;
    for (int l = 0; l < 16; ++l) {
      q[l] = b[4 + l] & 15;
      q[l + 16] = b[4 + l] >> 4;
    }
  }
#ifdef KVYARD_AVX2
  static void unpack(const uint8_t* row, int64_t blk, int64_t, int, __m256i& w0, __m256i& w1) {
    const uint8_t* b = row + blk * BYTES;
    const __m128i v = load16(b + 4);
    widen(nibble_lo(v), nibble_hi(v), w0, w1);
  }
#endif
};

// Q5_0 / Q5_1: nibbles as in Q4, plus the fifth bit of element j in bit j of a u32 qh.
template <int ID_, int BYTES_, int QH, bool MIN>
struct Q5Legacy {
  static constexpr int ID = ID_, QK = 32, BYTES = BYTES_, SUB = 32;
  static constexpr bool HAS_MIN = MIN;
  static constexpr int OFFSET = MIN ? 0 : 16;   // Q5_0: w = d*(q-16); Q5_1: w = d*q + m
  static void scales(const uint8_t* row, int64_t blk, int64_t, float* __restrict__ scale,
                     float* __restrict__ min) {
    const uint8_t* b = row + blk * BYTES;
    scale[0] = half_at(b);
    min[0] = MIN ? half_at(b + 2) : 0.f;
  }
  static void values(const uint8_t* row, int64_t blk, int64_t, int16_t* __restrict__ q) {
    const uint8_t* __restrict__ b = row + blk * BYTES;
    const uint32_t qh = u32_at(b + QH);
    const uint8_t* qs = b + QH + 4;
    for (int l = 0; l < 16; ++l) {
      q[l] = int16_t((qs[l] & 15) | (((qh >> l) & 1) << 4)) - OFFSET;
      q[l + 16] = int16_t((qs[l] >> 4) | (((qh >> (l + 16)) & 1) << 4)) - OFFSET;
    }
  }
#ifdef KVYARD_AVX2
  static void unpack(const uint8_t* row, int64_t blk, int64_t, int, __m256i& w0, __m256i& w1) {
    const uint8_t* b = row + blk * BYTES;
    const uint32_t qh = u32_at(b + QH);
    const __m128i v = load16(b + QH + 4);
    widen(nibble_lo(v), nibble_hi(v), w0, w1);
    const __m256i off = _mm256_set1_epi16(OFFSET);
    w0 = _mm256_sub_epi16(_mm256_or_si256(w0, fifth_bits(qh & 0xFFFF)), off);
    w1 = _mm256_sub_epi16(_mm256_or_si256(w1, fifth_bits(qh >> 16)), off);
  }
#endif
};

struct Q8_0 {  // d, qs[32] int8; w = d*q
  static constexpr int ID = 8, QK = 32, BYTES = 34, SUB = 32;
  static constexpr bool HAS_MIN = false;
  static void scales(const uint8_t* row, int64_t blk, int64_t, float* __restrict__ scale,
                     float* __restrict__ min) {
    const uint8_t* b = row + blk * BYTES;
    scale[0] = half_at(b);
    min[0] = 0.f;
  }
  static void values(const uint8_t* row, int64_t blk, int64_t, int16_t* __restrict__ q) {
    const uint8_t* __restrict__ b = row + blk * BYTES;
    for (int l = 0; l < 32; ++l) q[l] = int8_t(b[2 + l]);
  }
#ifdef KVYARD_AVX2
  static void unpack(const uint8_t* row, int64_t blk, int64_t, int, __m256i& w0, __m256i& w1) {
    const uint8_t* b = row + blk * BYTES;
    w0 = _mm256_cvtepi8_epi16(load16(b + 2));
    w1 = _mm256_cvtepi8_epi16(load16(b + 18));
  }
#endif
};

// ---- K-quants: 256-element super-blocks with 4/6/8-bit sub-block scales -----------------------

struct Q2_K {  // scales[16] (lo nibble scale, hi nibble min), qs[64], d, dmin; sub-blocks of 16
  static constexpr int ID = 10, QK = 256, BYTES = 84, SUB = 16;
  static constexpr bool HAS_MIN = true;
  static void scales(const uint8_t* row, int64_t blk, int64_t, float* __restrict__ scale,
                     float* __restrict__ min) {
    const uint8_t* b = row + blk * BYTES;
    const float d = half_at(b + 80), dmin = half_at(b + 82);
    uint8_t sc[16], mn[16];
    for (int j = 0; j < 16; ++j) {
      sc[j] = b[j] & 15;
      mn[j] = b[j] >> 4;
    }
    for (int h = 0; h < 16; h += 8) {
      scaled_bytes8(sc + h, d, scale + h);
      scaled_bytes8(mn + h, -dmin, min + h);
    }
  }
  // Element 128h + 32s + l is bits [2s, 2s+2) of qs[32h + l].
  static void values(const uint8_t* row, int64_t blk, int64_t, int16_t* __restrict__ q) {
    const uint8_t* __restrict__ b = row + blk * BYTES;
    const uint8_t* qs = b + 16;
    for (int h = 0; h < 2; ++h)
      for (int s = 0; s < 4; ++s)
        for (int l = 0; l < 32; ++l) q[h * 128 + s * 32 + l] = (qs[h * 32 + l] >> (2 * s)) & 3;
  }
#ifdef KVYARD_AVX2
  static void unpack(const uint8_t* row, int64_t blk, int64_t, int c, __m256i& w0, __m256i& w1) {
    const uint8_t* b = row + blk * BYTES;
    widen(bits(load32(b + 16 + (c / 4) * 32), 2 * (c % 4), 3), w0, w1);
  }
#endif
};

struct Q3_K {  // hmask[32], qs[64], scales[12] (16 x 6 bit, offset 32), d; sub-blocks of 16
  static constexpr int ID = 11, QK = 256, BYTES = 110, SUB = 16;
  static constexpr bool HAS_MIN = false;
  static void scales(const uint8_t* row, int64_t blk, int64_t, float* __restrict__ scale,
                     float* __restrict__ min) {
    const uint8_t* b = row + blk * BYTES;
    const uint8_t* sc = b + 96;
    const float d = half_at(b + 108);
    uint8_t v[16];
    for (int i = 0; i < 16; ++i) {
      const int low = i < 8 ? (sc[i] & 15) : (sc[i - 8] >> 4);
      const int high = (sc[8 + i % 4] >> (2 * (i / 4))) & 3;
      v[i] = uint8_t((low | (high << 4)) - 32);   // as int8: -32..31
    }
    scaled_bytes8<true>(v, d, scale);
    scaled_bytes8<true>(v + 8, d, scale + 8);
    std::memset(min, 0, 16 * sizeof(float));
  }
  // Element 32c + l (c = 4h + s): low bits [2s, 2s+2) of qs[32h + l]; bit c of hmask[l] set
  // means no -4 offset, i.e. q = (low | hbit << 2) - 4.
  static void values(const uint8_t* row, int64_t blk, int64_t, int16_t* __restrict__ q) {
    const uint8_t* __restrict__ b = row + blk * BYTES;
    const uint8_t* qs = b + 32;
    for (int c = 0; c < 8; ++c)
      for (int l = 0; l < 32; ++l) {
        const int low = (qs[(c / 4) * 32 + l] >> (2 * (c % 4))) & 3;
        const int high = (b[l] >> c) & 1;
        q[c * 32 + l] = int16_t((low | (high << 2)) - 4);
      }
  }
#ifdef KVYARD_AVX2
  static void unpack(const uint8_t* row, int64_t blk, int64_t, int c, __m256i& w0, __m256i& w1) {
    const uint8_t* b = row + blk * BYTES;
    const __m256i low = bits(load32(b + 32 + (c / 4) * 32), 2 * (c % 4), 3);
    const __m256i high = _mm256_slli_epi16(bits(load32(b), c, 1), 2);
    widen<4>(_mm256_or_si256(low, high), w0, w1);
  }
#endif
};

// The 12-byte packing of eight 6-bit scales and eight 6-bit mins shared by Q4_K and Q5_K:
// bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7, bytes 4-7 the same
// for the mins, bytes 8-11 the low 4 bits of scales 4-7 (low nibble) and mins 4-7 (high nibble).
// Unpacked four at a time in 32-bit words.
inline void k_scales(const uint8_t* b, float* __restrict__ scale, float* __restrict__ min) {
  const float d = half_at(b), dmin = half_at(b + 2);
  const uint32_t p0 = u32_at(b + 4), p1 = u32_at(b + 8), p2 = u32_at(b + 12);
  const uint32_t words[4] = {
      p0 & 0x3F3F3F3Fu,                                                   // scales 0-3
      (p2 & 0x0F0F0F0Fu) | (((p0 >> 6) & 0x03030303u) << 4),               // scales 4-7
      p1 & 0x3F3F3F3Fu,                                                   // mins 0-3
      ((p2 >> 4) & 0x0F0F0F0Fu) | (((p1 >> 6) & 0x03030303u) << 4)};      // mins 4-7
  uint8_t v[16];
  std::memcpy(v, words, 16);
  scaled_bytes8(v, d, scale);
  scaled_bytes8(v + 8, -dmin, min);   // -(dmin * m): negating dmin first rounds identically
}

struct Q4_K {  // d, dmin, scales[12], qs[128]; sub-blocks of 32
  static constexpr int ID = 12, QK = 256, BYTES = 144, SUB = 32;
  static constexpr bool HAS_MIN = true;
  static void scales(const uint8_t* row, int64_t blk, int64_t, float* __restrict__ scale,
                     float* __restrict__ min) {
    k_scales(row + blk * BYTES, scale, min);
  }
  // Sub-block c: the low (c even) or high (c odd) nibbles of qs[32 (c/2) ...+32].
  static void values(const uint8_t* row, int64_t blk, int64_t, int16_t* __restrict__ q) {
    const uint8_t* __restrict__ b = row + blk * BYTES;
    const uint8_t* qs = b + 16;
    for (int j = 0; j < 4; ++j)
      for (int l = 0; l < 32; ++l) {
        q[j * 64 + l] = qs[j * 32 + l] & 15;
        q[j * 64 + 32 + l] = qs[j * 32 + l] >> 4;
      }
  }
#ifdef KVYARD_AVX2
  static void unpack(const uint8_t* row, int64_t blk, int64_t, int c, __m256i& w0, __m256i& w1) {
    const uint8_t* b = row + blk * BYTES;
    widen(bits(load32(b + 16 + (c / 2) * 32), 4 * (c % 2), 15), w0, w1);
  }
#endif
};

struct Q5_K {  // d, dmin, scales[12], qh[32], qs[128]; the fifth bit of sub-block c is bit c of qh
  static constexpr int ID = 13, QK = 256, BYTES = 176, SUB = 32;
  static constexpr bool HAS_MIN = true;
  static void scales(const uint8_t* row, int64_t blk, int64_t, float* __restrict__ scale,
                     float* __restrict__ min) {
    k_scales(row + blk * BYTES, scale, min);
  }
  static void values(const uint8_t* row, int64_t blk, int64_t, int16_t* __restrict__ q) {
    const uint8_t* __restrict__ b = row + blk * BYTES;
    const uint8_t* qh = b + 16;
    const uint8_t* qs = b + 48;
    for (int j = 0; j < 4; ++j)
      for (int l = 0; l < 32; ++l) {
        q[j * 64 + l] = (qs[j * 32 + l] & 15) | (((qh[l] >> (2 * j)) & 1) << 4);
        q[j * 64 + 32 + l] = (qs[j * 32 + l] >> 4) | (((qh[l] >> (2 * j + 1)) & 1) << 4);
      }
  }
#ifdef KVYARD_AVX2
  static void unpack(const uint8_t* row, int64_t blk, int64_t, int c, __m256i& w0, __m256i& w1) {
    const uint8_t* b = row + blk * BYTES;
    const __m256i low = bits(load32(b + 48 + (c / 2) * 32), 4 * (c % 2), 15);
    const __m256i high = _mm256_slli_epi16(bits(load32(b + 16), c, 1), 4);
    widen(_mm256_or_si256(low, high), w0, w1);
  }
#endif
};

struct Q6_K {  // ql[128], qh[64], scales[16] int8, d; sub-blocks of 16; w = d*sc*(q-32)
  static constexpr int ID = 14, QK = 256, BYTES = 210, SUB = 16;
  static constexpr bool HAS_MIN = false;
  static void scales(const uint8_t* row, int64_t blk, int64_t, float* __restrict__ scale,
                     float* __restrict__ min) {
    const uint8_t* b = row + blk * BYTES;
    const float d = half_at(b + 208);
    scaled_bytes8<true>(b + 192, d, scale);
    scaled_bytes8<true>(b + 200, d, scale + 8);
    std::memset(min, 0, 16 * sizeof(float));
  }
  // Element 32c + l (c = 4h + t): nibble t/2 of ql[64h + 32(t%2) + l] and bits [2t, 2t+2) of
  // qh[32h + l] as bits 4-5.
  static void values(const uint8_t* row, int64_t blk, int64_t, int16_t* __restrict__ q) {
    const uint8_t* __restrict__ b = row + blk * BYTES;
    for (int c = 0; c < 8; ++c) {
      const int h = c / 4, t = c % 4;
      for (int l = 0; l < 32; ++l) {
        const int low = (b[h * 64 + (t % 2) * 32 + l] >> (4 * (t / 2))) & 15;
        const int high = (b[128 + h * 32 + l] >> (2 * t)) & 3;
        q[c * 32 + l] = int16_t((low | (high << 4)) - 32);
      }
    }
  }
#ifdef KVYARD_AVX2
  static void unpack(const uint8_t* row, int64_t blk, int64_t, int c, __m256i& w0, __m256i& w1) {
    const uint8_t* b = row + blk * BYTES;
    const int h = c / 4, t = c % 4;
    const __m256i low = bits(load32(b + h * 64 + (t % 2) * 32), 4 * (t / 2), 15);
    const __m256i high = _mm256_slli_epi16(bits(load32(b + 128 + h * 32), 2 * t, 3), 4);
    widen<32>(_mm256_or_si256(low, high), w0, w1);
  }
#endif
};

// ---- planar repacks of the legacy formats ----------------------------------------------------
//
// The same bytes per row as the file, regrouped per row into planes:
//   [qs of every block][header field 0 of every block][field 1 ...]...
// where the header (the bytes before qs: d, m, qh) is cut into 2-byte fields. A kernel then
// converts 8 consecutive scales with one vcvtph2ps instead of one block at a time. ID is
// PLANAR_BASE + the file format's id; repack_row builds it at load.
constexpr int PLANAR_BASE = 256;

template <class Base, int QSB>
struct Planar {
  static constexpr int ID = PLANAR_BASE + Base::ID, QK = 32, BYTES = Base::BYTES, SUB = 32;
  static constexpr bool HAS_MIN = Base::HAS_MIN, PLANAR = true;
  static constexpr int HEADER = BYTES - QSB, FIELDS = HEADER / 2;
  static constexpr bool SIGNED_BYTES = false;   // Q8_0 overrides
  static_assert(HEADER % 2 == 0, "headers are whole fp16/u16 fields");

  static const uint8_t* qs(const uint8_t* row, int64_t blk) { return row + blk * QSB; }
  // Field f (fp16 d, fp16 m, u16 halves of qh) of every block, as nb 2-byte values.
  static const uint8_t* field(const uint8_t* row, int64_t nb, int f) {
    return row + nb * QSB + int64_t(f) * nb * 2;
  }
  static void repack_row(const uint8_t* native, uint8_t* out, int64_t nb) {
    for (int64_t blk = 0; blk < nb; ++blk) {
      const uint8_t* b = native + blk * BYTES;
      std::memcpy(out + blk * QSB, b + HEADER, QSB);
      for (int f = 0; f < FIELDS; ++f) std::memcpy(out + nb * QSB + (f * nb + blk) * 2, b + 2 * f, 2);
    }
  }
  // The file's block, reassembled; the scalar paths (dequantize, portable kernel) go through it.
  static void native_block(const uint8_t* row, int64_t blk, int64_t nb, uint8_t* b) {
    for (int f = 0; f < FIELDS; ++f) std::memcpy(b + 2 * f, field(row, nb, f) + blk * 2, 2);
    std::memcpy(b + HEADER, qs(row, blk), QSB);
  }
  static void scales(const uint8_t* row, int64_t blk, int64_t nb, float* __restrict__ scale,
                     float* __restrict__ min) {
    uint8_t b[BYTES];
    native_block(row, blk, nb, b);
    Base::scales(b, 0, 1, scale, min);
  }
  static void values(const uint8_t* row, int64_t blk, int64_t nb, int16_t* __restrict__ q) {
    uint8_t b[BYTES];
    native_block(row, blk, nb, b);
    Base::values(b, 0, 1, q);
  }
};

using Q5_0 = Q5Legacy<6, 22, 2, false>;
using Q5_1 = Q5Legacy<7, 24, 4, true>;

// What the planar kernel needs beyond the layout: w = d * (u - OFFSET) + m with u the unsigned
// (Q8_0: signed) lane values, m read from field MIN_FIELD (-1: none), the fifth bits of Q5 from
// fields QH_FIELD and QH_FIELD + 1 (-1: none).
struct PQ4_0 : Planar<Q4_0, 16> {
  static constexpr int OFFSET = 8, MIN_FIELD = -1, QH_FIELD = -1;
};
struct PQ4_1 : Planar<Q4_1, 16> {
  static constexpr int OFFSET = 0, MIN_FIELD = 1, QH_FIELD = -1;
};
struct PQ5_0 : Planar<Q5_0, 16> {
  static constexpr int OFFSET = 16, MIN_FIELD = -1, QH_FIELD = 1;
};
struct PQ5_1 : Planar<Q5_1, 16> {
  static constexpr int OFFSET = 0, MIN_FIELD = 1, QH_FIELD = 2;
};
struct PQ8_0 : Planar<Q8_0, 32> {
  static constexpr int OFFSET = 0, MIN_FIELD = -1, QH_FIELD = -1;
  static constexpr bool SIGNED_BYTES = true;
};

template <class F>
constexpr bool is_planar = requires { F::PLANAR; };

#ifdef KVYARD_AVX2
// Lanes of planar block blk before OFFSET: 0..15 in w0, 16..31 in w1.
template <class P>
inline void unpack_planar(const uint8_t* row, int64_t blk, int64_t nb, __m256i& w0, __m256i& w1) {
  const uint8_t* q = P::qs(row, blk);
  if constexpr (P::SIGNED_BYTES) {
    w0 = _mm256_cvtepi8_epi16(load16(q));
    w1 = _mm256_cvtepi8_epi16(load16(q + 16));
  } else {
    const __m128i v = load16(q);
    widen(nibble_lo(v), nibble_hi(v), w0, w1);
    if constexpr (P::QH_FIELD >= 0) {
      uint16_t lo, hi;
      std::memcpy(&lo, P::field(row, nb, P::QH_FIELD) + blk * 2, 2);
      std::memcpy(&hi, P::field(row, nb, P::QH_FIELD + 1) + blk * 2, 2);
      w0 = _mm256_or_si256(w0, fifth_bits(lo));
      w1 = _mm256_or_si256(w1, fifth_bits(hi));
    }
  }
}

// Lane j of 128-bit half h equals 16 where bit 2j + odd of the u16 (qh2 >> 16h) is set.
inline __m256i fifth_bits_paired(uint32_t qh2, bool odd) {
  const __m256i t = _mm256_set_m128i(_mm_set1_epi16(short(qh2 >> 16)), _mm_set1_epi16(short(qh2)));
  const __m256i even = _mm256_setr_epi16(1, 4, 16, 64, 256, 1024, 4096, 16384,
                                         1, 4, 16, 64, 256, 1024, 4096, 16384);
  const __m256i bit = odd ? _mm256_add_epi16(even, even) : even;
  return _mm256_and_si256(_mm256_cmpeq_epi16(_mm256_and_si256(t, bit), bit), _mm256_set1_epi16(16));
}

// A pair of blocks of a nibble format (blk + 1 < nb) from one 32-byte load of their qs, as
// int16 lanes before OFFSET. 128-bit half h is block blk + h; its 16-bit lane j holds bytes 2j
// and 2j + 1, whose nibbles are elements 2j, 2j + 16, 2j + 1 and 2j + 17:
//   v[0]: elements 2j   v[1]: 2j + 16   v[2]: 2j + 1   v[3]: 2j + 17     (j = 0..7)
// The activations of a pair are stored in this order (gguf_kernels.cpp, QuantizedActs).
template <class P>
inline void unpack_pair(const uint8_t* row, int64_t blk, int64_t nb, __m256i (&v)[4]) {
  const __m256i q = load32(P::qs(row, blk)), low4 = _mm256_set1_epi16(15);
  v[0] = _mm256_and_si256(q, low4);
  v[1] = _mm256_and_si256(_mm256_srli_epi16(q, 4), low4);
  v[2] = _mm256_and_si256(_mm256_srli_epi16(q, 8), low4);
  v[3] = _mm256_srli_epi16(q, 12);
  if constexpr (P::QH_FIELD >= 0) {   // the u16 qh halves of the two blocks are adjacent
    const uint32_t lo = u32_at(P::field(row, nb, P::QH_FIELD) + blk * 2);
    const uint32_t hi = u32_at(P::field(row, nb, P::QH_FIELD + 1) + blk * 2);
    v[0] = _mm256_or_si256(v[0], fifth_bits_paired(lo, false));
    v[1] = _mm256_or_si256(v[1], fifth_bits_paired(hi, false));
    v[2] = _mm256_or_si256(v[2], fifth_bits_paired(lo, true));
    v[3] = _mm256_or_si256(v[3], fifth_bits_paired(hi, true));
  }
}
#endif

#ifdef KVYARD_AVX512
// A pair of planar blocks (a = blk, b = blk + 1 < nb) in the split lane order, before OFFSET:
//   lo: [a 0..15 | b 0..15]   hi: [a 16..31 | b 16..31]        (32 int16 lanes each)
// The nibble formats widen their 32 qs bytes (a's 16, then b's) to int16: the low nibble of byte
// l is element l, the high one element l + 16. Q8_0 (SIGNED_BYTES) is not read in pairs.
template <class P>
inline void unpack_split(const uint8_t* row, int64_t blk, int64_t nb, __m512i& lo, __m512i& hi) {
  static_assert(!P::SIGNED_BYTES, "Q8_0 blocks are read one at a time");
  const __m512i q = _mm512_cvtepu8_epi16(load32(P::qs(row, blk)));
  lo = _mm512_and_si512(q, _mm512_set1_epi16(15));
  hi = _mm512_srli_epi16(q, 4);   // bytes were zero-extended: no mask needed
  if constexpr (P::QH_FIELD >= 0) {   // bit j of the pair's u32 (a's u16, then b's) is lane j's
    const __m512i sixteen = _mm512_set1_epi16(16);
    lo = _mm512_mask_add_epi16(lo, __mmask32(u32_at(P::field(row, nb, P::QH_FIELD) + blk * 2)), lo, sixteen);
    hi = _mm512_mask_add_epi16(hi, __mmask32(u32_at(P::field(row, nb, P::QH_FIELD + 1) + blk * 2)), hi,
                              sixteen);
  }
}
#endif

// ---- row-interleaved tiles (AVX-512 VNNI) ------------------------------------------------------
//
// Q4_0, Q4_1 and Q8_0 for the AVX-512 int kernel: every 16 rows (a tile: the same bytes
// [16t, 16t + 16) * bytes_per_row as in the file) regrouped per block so that one 32-byte load
// holds the same 2-byte unit of all 16 rows. Block blk of a tile is 16 * BYTES bytes at
// blk * 16 * BYTES:
//   qs      unit u (bytes 2u, 2u + 1 of the block's qs) of row r at (16u + r) * 2
//   fields  the header's 2-byte fields (d; m for Q4_1), each as 16 rows' values, after the qs
// Widened to int16, a unit load gives lane pair (2r, 2r + 1) = row r: one vpdpwssd with a
// broadcast activation pair adds two products per row into int32 lane r, so a tile's 16 row
// sums build up in one register with no reduction. A tensor's last rows % 16 (not a whole tile)
// stay in the planar layout (Tail). ID is X16_BASE + the file format's id.
constexpr int X16_BASE = 512, X16_ROWS = 16;

template <class Base, class TailP, int QSB>
struct X16 {
  using File = Base;   // the file's block format
  using Tail = TailP;
  static constexpr int ID = X16_BASE + Base::ID, QK = 32, BYTES = Base::BYTES, QS = QSB;
  static constexpr int HEADER = BYTES - QSB, FIELDS = HEADER / 2, UNITS = QSB / 2;
  static constexpr bool HAS_MIN = Base::HAS_MIN, SIGNED_BYTES = TailP::SIGNED_BYTES;
  static constexpr int OFFSET = TailP::OFFSET;   // Q4_0: w = d * (u - 8)

  static const uint8_t* block_at(const uint8_t* tile, int64_t blk) { return tile + blk * X16_ROWS * BYTES; }
  static const uint8_t* field(const uint8_t* block, int f) { return block + X16_ROWS * QSB + f * X16_ROWS * 2; }

  // 16 file rows (row r at native + r * row_bytes) -> one tile.
  static void repack_tile(const uint8_t* native, int64_t row_bytes, int64_t nb, uint8_t* tile) {
    for (int64_t blk = 0; blk < nb; ++blk) {
      uint8_t* out = tile + blk * X16_ROWS * BYTES;
      for (int r = 0; r < X16_ROWS; ++r) {
        const uint8_t* b = native + r * row_bytes + blk * BYTES;
        for (int u = 0; u < UNITS; ++u) std::memcpy(out + (X16_ROWS * u + r) * 2, b + HEADER + 2 * u, 2);
        for (int f = 0; f < FIELDS; ++f) std::memcpy(out + X16_ROWS * QSB + (f * X16_ROWS + r) * 2, b + 2 * f, 2);
      }
    }
  }
  // Row r's block blk as the file has it.
  static void native_block(const uint8_t* tile, int r, int64_t blk, uint8_t* b) {
    const uint8_t* in = block_at(tile, blk);
    for (int u = 0; u < UNITS; ++u) std::memcpy(b + HEADER + 2 * u, in + (X16_ROWS * u + r) * 2, 2);
    for (int f = 0; f < FIELDS; ++f) std::memcpy(b + 2 * f, field(in, f) + r * 2, 2);
  }
};

template <class F>
constexpr bool is_x16 = requires { typename F::Tail; };

// Calls fn(Format{}) for the row-interleaved layout id qtype; false where qtype is none.
template <class Fn>
bool dispatch_x16(int64_t qtype, Fn&& fn) {
  switch (qtype) {
    case X16_BASE + Q4_0::ID: fn(X16<Q4_0, PQ4_0, 16>{}); return true;
    case X16_BASE + Q4_1::ID: fn(X16<Q4_1, PQ4_1, 16>{}); return true;
    case X16_BASE + Q8_0::ID: fn(X16<Q8_0, PQ8_0, 32>{}); return true;
    default: return false;
  }
}

// Calls fn(Format{}) for the format whose ggml id is qtype.
template <class Fn>
void dispatch(int64_t qtype, Fn&& fn) {
  switch (qtype) {
    case Q4_0::ID: return fn(Q4_0{});
    case Q4_1::ID: return fn(Q4_1{});
    case Q5_0::ID: return fn(Q5_0{});
    case Q5_1::ID: return fn(Q5_1{});
    case Q8_0::ID: return fn(Q8_0{});
    case Q2_K::ID: return fn(Q2_K{});
    case Q3_K::ID: return fn(Q3_K{});
    case Q4_K::ID: return fn(Q4_K{});
    case Q5_K::ID: return fn(Q5_K{});
    case Q6_K::ID: return fn(Q6_K{});
    case PQ4_0::ID: return fn(PQ4_0{});
    case PQ4_1::ID: return fn(PQ4_1{});
    case PQ5_0::ID: return fn(PQ5_0{});
    case PQ5_1::ID: return fn(PQ5_1{});
    case PQ8_0::ID: return fn(PQ8_0{});
    default: TORCH_CHECK(false, "kvyard_gguf: unsupported ggml type id ", qtype);
  }
}

}  // namespace kvyard_gguf
