// The native C ABI between kvyard's C++ decode step (core/kernels/decode_loop) and the plugins
// whose kernels it runs: plain structs of function pointers, no ATen, no dispatcher, so the step
// can call them from inside its own OpenMP region, thread by thread.
//
// A plugin builds a descriptor in memory it owns (typically the bytes of a uint8 tensor it hands
// to Python together with the tensors the descriptor points into) and gives the core its address.
// The core never frees a descriptor; whoever holds the returned tensors keeps it valid.
//
// Invariants every implementation keeps:
//   - no function opens a parallel region, allocates through ATen or throws: they are called
//     from worker threads of the step's region;
//   - results are bitwise those of the plugin's dispatcher op on the same inputs (the same
//     arithmetic in the same order), so the native step equals the dispatcher loop;
//   - functions called on disjoint ranges from different threads write disjoint memory.
#pragma once

#include <cstdint>

extern "C" {

#define KVYARD_NATIVE_ABI 1

// Activation dtypes (x, y, q, out): the model's compute dtype.
enum kvyard_native_dtype : int64_t { KVYARD_NATIVE_F32 = 0, KVYARD_NATIVE_BF16 = 1 };

// A linear layer y [B, out_features] = x [B, in_features] @ W^T (+ bias), for B <= max_rows.
//   scratch_bytes(ctx, B)                       per-call workspace prepare() fills
//   prepare(ctx, x, ldx, B, scratch)            once per input, one thread (e.g. activation
//                                               quantization); x rows are ldx elements apart
//   rows(ctx, scratch, B, y, ldy, r0, r1)       output columns [r0, r1) of every row, y rows ldy
//                                               elements apart; r0 (and r1 unless it is
//                                               out_features) are multiples of row_grain; called
//                                               concurrently on disjoint ranges after prepare
struct kvyard_native_linear {
  int64_t abi;   // KVYARD_NATIVE_ABI
  const void* ctx;
  int64_t dtype, out_features, in_features, row_grain, max_rows;
  int64_t (*scratch_bytes)(const void* ctx, int64_t B);
  void (*prepare)(const void* ctx, const void* x, int64_t ldx, int64_t B, void* scratch);
  void (*rows)(const void* ctx, const void* scratch, int64_t B, void* y, int64_t ldy, int64_t r0,
               int64_t r1);
};

// Decode attention of one layer over its paged KV pool (the pools are the descriptor's own):
//   pairs(ctx, q [B, H, D], table int32 [R, table_stride], rows int64 [B], lens int64 [B],
//         out [B, H, D], p0, p1)
// computes the pairs p in [p0, p1) of (sequence b = p / kv_heads, kv head h = p % kv_heads):
// out[b, h*G:(h+1)*G] for the G = heads / kv_heads query heads of group h, reading only K/V
// head h of the sequence's lens[b] slots. Concurrent calls take disjoint pair ranges.
struct kvyard_native_attention {
  int64_t abi;   // KVYARD_NATIVE_ABI
  const void* ctx;
  int64_t dtype, heads, kv_heads, head_dim;
  void (*pairs)(const void* ctx, const void* q, const int32_t* table, int64_t table_stride,
                const int64_t* rows, const int64_t* lens, int64_t B, void* out, int64_t p0, int64_t p1);
};

}  // extern "C"
