// The decode step of a pre-norm decoder (the graph of decode_loop.cpp) with no dispatcher and no
// parallel region per op: every linear layer and the attention are native descriptors
// (kvyard_native.h) the plugins built, called directly; the layer ops are layer_ops.h's row
// arithmetic; all buffers belong to the plan. Where decode_loop.cpp opens ~150 parallel regions
// per step (one per kernel call, plus the dispatcher, an output allocation and an activation
// quantization each), this runs the whole step in one OpenMP region of at::get_num_threads()
// threads (team.h): the calling thread runs the step, the others take chunks of its parallel stages.
//
// Per layer, the calling thread alone runs the serial stages (S); the team splits the parallel
// ones (P) in chunks:
//   S  x, residual = rmsnorm(h, in_norm, residual); prepare qkv(x)
//   P  qkv [B, (H + 2 Hkv) D] = qkv rows, chunks of whole row groups
//   P  per (sequence b, kv head g) pair: rotary of q heads of group g -> q [B, H, D], rotary of
//      k head g and v head g into the pool at loc[b], then attention of the pair -> attn [B, H, D]
//      (a pair reads only its own K/V head, written by the same chunk just before)
//   S  prepare o(attn)                      P  o [B, hidden] = o rows
//   S  x, residual = rmsnorm(o, post_norm, residual); prepare gate_up(x)
//   P  gu [B, 2I] = gate_up rows
//   S  act [B, I] = silu(gate) * up; prepare down(act)
//   P  h [B, hidden] = down rows
// then S: rmsnorm(h, final_norm, residual) -> out [B, hidden].
//
// Bitwise equal to decode_loop.cpp's step: the same kernels (the descriptors promise their ops'
// results), the same row arithmetic, and rmsnorm's row sums from ATen's own sum kernel, called by
// the calling thread on a [B, hidden] float tensor as the fused op does. Built with
// -ffp-contract=off, as fused_ops.cpp.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/rand.h>
#include <ATen/ops/sum.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <array>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "kvyard_native.h"
#include "layer_ops.h"
#include "plan_table.h"
#include "team.h"

namespace kvyard_native_step {
namespace {

using namespace kvyard_layer_ops;

// ---- rmsnorm's row sums ----------------------------------------------------------------------
//
// The fused rmsnorm takes its sums of squares from at::sum, whose order the result depends on.
// ATen's float inner sum (SumKernel.cpp, vectorized_inner_sum) adds L-lane vectors: the row as
// [n / L] vectors, read 4 interleaved (ilp) into a cascade of 4 levels of 2^p steps, the
// accumulators folded, the scalar tail added, then the lanes in order. aten_order_sum repeats
// that for L = 16 (AVX-512 kernels) or 8 (AVX2); the plan checks at start which L (if any)
// reproduces at::sum here bit for bit, and otherwise keeps calling at::sum.

inline int64_t ceil_log2(int64_t x) {   // ATen's utils::CeilLog2
  if (x <= 2) return 1;
  return 64 - __builtin_clzll(static_cast<uint64_t>(x) - 1);
}

template <int L>
float aten_order_sum(const float* x, int64_t n) {
  using Vec = std::array<float, L>;
  auto add = [](Vec& a, const float* p) {
    for (int l = 0; l < L; ++l) a[l] += p[l];
  };
  const int64_t vecs = n / L, rows = vecs / 4;   // row_sum: ilp factor 4
  constexpr int LEVELS = 4;
  const int64_t power = std::max<int64_t>(4, ceil_log2(rows) / LEVELS), step = int64_t(1) << power;
  const int64_t mask = step - 1;
  Vec acc[LEVELS][4] = {};
  int64_t i = 0;
  while (i + step <= rows) {
    for (int64_t j = 0; j < step; ++j, ++i)
      for (int k = 0; k < 4; ++k) add(acc[0][k], x + (i * 4 + k) * L);
    for (int j = 1; j < LEVELS; ++j) {
      for (int k = 0; k < 4; ++k) {
        for (int l = 0; l < L; ++l) acc[j][k][l] += acc[j - 1][k][l];
        acc[j - 1][k] = Vec{};
      }
      if ((i & (mask << (j * power))) != 0) break;
    }
  }
  for (; i < rows; ++i)
    for (int k = 0; k < 4; ++k) add(acc[0][k], x + (i * 4 + k) * L);
  for (int j = 1; j < LEVELS; ++j)
    for (int k = 0; k < 4; ++k)
      for (int l = 0; l < L; ++l) acc[0][k][l] += acc[j][k][l];
  Vec partial = acc[0][0];
  for (int64_t v = rows * 4; v < vecs; ++v) add(partial, x + v * L);
  for (int k = 1; k < 4; ++k)
    for (int l = 0; l < L; ++l) partial[l] += acc[0][k][l];
  float total = 0.f;
  for (int64_t e = vecs * L; e < n; ++e) total += x[e];
  for (int l = 0; l < L; ++l) total += partial[l];
  return 0.f + total;   // the output starts at zero and accumulates the row's sum
}

// The lanes L with which aten_order_sum equals at::sum on rows of n floats here (0: none).
int sum_lanes(int64_t n) {
  // squares of varied size, from a generator of its own (the global one's state is the user's)
  at::Tensor x = at::rand({64, n}, at::detail::createCPUGenerator(0), at::kFloat).mul_(8).pow_(2);
  const at::Tensor ref = at::sum(x, {1});
  for (int lanes : {16, 8}) {
    bool equal = true;
    for (int64_t r = 0; r < x.size(0) && equal; ++r) {
      const float got = lanes == 16 ? aten_order_sum<16>(x.data_ptr<float>() + r * n, n)
                                    : aten_order_sum<8>(x.data_ptr<float>() + r * n, n);
      equal = std::memcmp(&got, ref.data_ptr<float>() + r, sizeof(float)) == 0;
    }
    if (equal) return lanes;
  }
  return 0;
}

// ---- the plan ---------------------------------------------------------------------------------

struct Linear {   // segments' outputs side by side: [B, out]
  std::vector<const kvyard_native_linear*> segments;
  int64_t out = 0;
};

enum Which { QKV = 0, O = 1, GATE_UP = 2, DOWN = 3 };

struct Layer {
  at::Tensor in_norm, post_norm, k_buf, v_buf;
  Linear linears[4];
  const kvyard_native_attention* attention;
  int64_t heads, kv_heads, head_dim;
};

constexpr int64_t ALIGN = 64;
inline int64_t aligned(int64_t n) { return (n + ALIGN - 1) / ALIGN * ALIGN; }

struct Plan {
  double eps;
  at::Tensor final_norm;
  at::ScalarType dtype;
  int64_t hidden, max_rows;
  int sum_lanes = -1;   // aten_order_sum's L, 0: at::sum; -1: not checked yet
  std::vector<Layer> layers;
  // Buffers for up to `capacity` rows, (re)made by reserve(): activations in dtype, float squares
  // and sums for rmsnorm, a float row for silu, one scratch region per linear segment.
  int64_t capacity = 0;
  at::Tensor residual, x, qkv, q, attn, o, gu, act, h, squares, sums, silu;
  std::vector<uint8_t> scratch;
  int64_t scratch_stride = 0;   // bytes between segments' regions
  Team team;
  int64_t solo_left = 0;        // steps still to run solo after stalls (team.h)
  int64_t solo_run = 0;         // length of the last solo run: doubles while the team keeps stalling
  std::mutex stepping;          // one step at a time per plan (the team and buffers are the plan's)
};

kvyard_decode_plans::PlanTable<Plan> plans;

Plan& plan_at(int64_t id) { return plans.at(id); }

int64_t plan_new(double eps, const at::Tensor& final_norm, int64_t max_rows) {
  TORCH_CHECK(final_norm.dim() == 1 && final_norm.is_contiguous() &&
                  (final_norm.scalar_type() == at::kFloat || final_norm.scalar_type() == at::kBFloat16),
              "native decode plan: the final norm must be a contiguous float32 or bfloat16 [hidden] tensor");
  TORCH_CHECK(max_rows > 0, "native decode plan: max_rows must be positive");
  auto plan = std::make_unique<Plan>();
  plan->eps = eps;
  plan->final_norm = final_norm;
  plan->dtype = final_norm.scalar_type();
  plan->hidden = final_norm.size(0);
  plan->max_rows = max_rows;
  return plans.add(std::move(plan));
}

void plan_free(int64_t id) { plans.free(id); }

int64_t native_dtype(at::ScalarType t) { return t == at::kBFloat16 ? KVYARD_NATIVE_BF16 : KVYARD_NATIVE_F32; }

void check_norm(const Plan& P, const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 1 && w.size(0) == P.hidden && w.is_contiguous() && w.scalar_type() == P.dtype,
              "native decode plan: norm weights must be contiguous [", P.hidden, "] ", P.dtype);
}

void plan_add_layer(int64_t id, const at::Tensor& in_norm, const at::Tensor& post_norm, const at::Tensor& k_buf,
                    const at::Tensor& v_buf, int64_t attention) {
  Plan& P = plan_at(id);
  check_norm(P, in_norm);
  check_norm(P, post_norm);
  const auto* a = reinterpret_cast<const kvyard_native_attention*>(attention);
  TORCH_CHECK(a != nullptr && a->abi == KVYARD_NATIVE_ABI && a->dtype == native_dtype(P.dtype),
              "native decode plan: the attention descriptor's ABI or dtype differs from the plan's");
  TORCH_CHECK(k_buf.is_contiguous() && v_buf.is_contiguous() && k_buf.scalar_type() == P.dtype &&
                  v_buf.scalar_type() == P.dtype && k_buf.dim() == 3 && k_buf.sizes() == v_buf.sizes() &&
                  k_buf.size(1) == a->kv_heads && k_buf.size(2) == a->head_dim,
              "native decode plan: the KV pools must be contiguous [S, Hkv, D] ", P.dtype, " tensors");
  P.layers.push_back(Layer{in_norm, post_norm, k_buf, v_buf, {}, a, a->heads, a->kv_heads, a->head_dim});
}

void plan_add_segment(int64_t id, int64_t layer, int64_t which, int64_t linear) {
  Plan& P = plan_at(id);
  TORCH_CHECK(layer >= 0 && layer < static_cast<int64_t>(P.layers.size()) && which >= 0 && which < 4,
              "native decode plan: no linear ", which, " in layer ", layer);
  const auto* d = reinterpret_cast<const kvyard_native_linear*>(linear);
  TORCH_CHECK(d != nullptr && d->abi == KVYARD_NATIVE_ABI && d->dtype == native_dtype(P.dtype) && d->row_grain > 0,
              "native decode plan: a linear descriptor's ABI or dtype differs from the plan's");
  Linear& L = P.layers[layer].linears[which];
  TORCH_CHECK(L.segments.empty() || L.segments[0]->in_features == d->in_features,
              "native decode plan: the segments of one linear take different inputs");
  L.segments.push_back(d);
  L.out += d->out_features;
  P.max_rows = std::min(P.max_rows, d->max_rows);
}

// Checks the shapes of the finished plan and sizes its buffers for `rows` rows.
void reserve(Plan& P, int64_t rows) {
  if (rows <= P.capacity) return;
  TORCH_CHECK(!P.layers.empty(), "native decode plan: no layers");
  int64_t qkv = 0, attn = 0, gu = 0, segments = 0, seg_bytes = 0;
  for (const Layer& L : P.layers) {
    const int64_t hd = L.heads * L.head_dim;
    for (const Linear& lin : L.linears) TORCH_CHECK(!lin.segments.empty(), "native decode plan: a linear has no segment");
    TORCH_CHECK(L.linears[QKV].out == (L.heads + 2 * L.kv_heads) * L.head_dim && L.linears[O].out == P.hidden &&
                    L.linears[O].segments[0]->in_features == hd && L.linears[QKV].segments[0]->in_features == P.hidden &&
                    L.linears[GATE_UP].segments[0]->in_features == P.hidden && L.linears[GATE_UP].out % 2 == 0 &&
                    L.linears[DOWN].segments[0]->in_features == L.linears[GATE_UP].out / 2 &&
                    L.linears[DOWN].out == P.hidden,
                "native decode plan: the layer's linear shapes do not form the decoder graph");
    qkv = std::max(qkv, L.linears[QKV].out);
    attn = std::max(attn, hd);
    gu = std::max(gu, L.linears[GATE_UP].out);
    for (const Linear& lin : L.linears) {
      segments = std::max<int64_t>(segments, lin.segments.size());
      for (const auto* d : lin.segments) seg_bytes = std::max(seg_bytes, d->scratch_bytes(d->ctx, rows));
    }
  }
  const auto opts = at::TensorOptions().dtype(P.dtype);
  P.residual = at::empty({rows, P.hidden}, opts);
  P.x = at::empty({rows, P.hidden}, opts);
  P.qkv = at::empty({rows, qkv}, opts);
  P.q = at::empty({rows, attn}, opts);
  P.attn = at::empty({rows, attn}, opts);
  P.o = at::empty({rows, P.hidden}, opts);
  P.gu = at::empty({rows, gu}, opts);
  P.act = at::empty({rows, gu / 2}, opts);
  P.h = at::empty({rows, P.hidden}, opts);
  P.squares = at::empty({rows, P.hidden}, at::kFloat);
  P.sums = at::empty({rows}, at::kFloat);
  P.silu = at::empty({gu / 2}, at::kFloat);
  P.scratch_stride = aligned(seg_bytes);
  P.scratch.assign(segments * P.scratch_stride + ALIGN, 0);
  P.capacity = rows;
}

// The plan's checked shape: its buffers sized for max_rows; returns max_rows.
int64_t plan_check(int64_t id) {
  Plan& P = plan_at(id);
  reserve(P, P.max_rows);
  if (P.sum_lanes < 0) P.sum_lanes = sum_lanes(P.hidden);
  return P.max_rows;
}

// Which row sum the plan's rmsnorm uses: aten_order_sum's lanes, 0 for at::sum (after check).
int64_t plan_sum_lanes(int64_t id) { return plan_at(id).sum_lanes; }

// ---- the step ---------------------------------------------------------------------------------

struct StepArgs {
  const void* h_in;
  const void *cos, *sin;   // [B, 1, D] rows cs_stride elements apart
  int64_t cs_stride;
  const int64_t* loc;
  const int32_t* table;
  int64_t table_stride;
  const int64_t *rows, *lens;
  int64_t B;
  void* out;
  bool shared_rows;   // rows may be positions of one sequence (a speculative verify): every row's
                      // K/V is written before any row's attention reads the pool
};

template <class T>
class Step {
 public:
  Step(Plan& P, const StepArgs& a) : P(P), a(a), team(P.team) {}

  void run() {
    const int64_t hid = P.hidden;
    T* res = ptr(P.residual);
    bool first = true;
    for (const Layer& L : P.layers) {
      if (first) {
        std::memcpy(res, a.h_in, a.B * hid * sizeof(T));
        rmsnorm(static_cast<const T*>(a.h_in), nullptr, L.in_norm, ptr(P.x));
      } else {
        rmsnorm(ptr(P.h), res, L.in_norm, ptr(P.x));
      }
      first = false;
      prepare(L.linears[QKV], ptr(P.x), hid);
      rows(L.linears[QKV], ptr(P.qkv));
      attention(L);
      prepare(L.linears[O], ptr(P.attn), L.heads * L.head_dim);
      rows(L.linears[O], ptr(P.o));
      rmsnorm(ptr(P.o), res, L.post_norm, ptr(P.x));
      prepare(L.linears[GATE_UP], ptr(P.x), hid);
      rows(L.linears[GATE_UP], ptr(P.gu));
      const int64_t d = L.linears[GATE_UP].out / 2;
      for (int64_t t = 0; t < a.B; ++t)
        silu_and_mul_row<T>(ptr(P.gu) + t * 2 * d, ptr(P.gu) + t * 2 * d + d, d, P.silu.data_ptr<float>(),
                            ptr(P.act) + t * d);
      prepare(L.linears[DOWN], ptr(P.act), d);
      rows(L.linears[DOWN], ptr(P.h));
    }
    rmsnorm(ptr(P.h), res, P.final_norm, static_cast<T*>(a.out));
  }

 private:
  struct Chunk {   // output columns [r0, r1) of one segment
    int64_t segment, r0, r1, col;
  };

  Plan& P;
  const StepArgs& a;
  Team& team;
  // what the running parallel stage works on (set before team.run, read by its chunks)
  const Linear* linear = nullptr;
  T* y = nullptr;
  std::vector<Chunk> chunks;
  const Layer* layer = nullptr;

  static T* ptr(const at::Tensor& t) { return static_cast<T*>(t.data_ptr()); }
  void* scratch(size_t segment) const {
    const auto base = (reinterpret_cast<uintptr_t>(P.scratch.data()) + ALIGN - 1) / ALIGN * ALIGN;
    return reinterpret_cast<void*>(base + segment * P.scratch_stride);
  }

  void prepare(const Linear& L, const T* x, int64_t ldx) {
    for (size_t s = 0; s < L.segments.size(); ++s)
      L.segments[s]->prepare(L.segments[s]->ctx, x, ldx, a.B, scratch(s));
  }

  // Every segment's output rows in chunks of whole row groups, about CHUNKS_PER_THREAD per thread
  // and segment: small enough to balance threads that run at different speeds.
  static constexpr int64_t CHUNKS_PER_THREAD = 4;

  void rows(const Linear& L, T* out) {
    chunks.clear();
    int64_t col = 0;
    for (size_t s = 0; s < L.segments.size(); ++s) {
      const kvyard_native_linear& d = *L.segments[s];
      const int64_t groups = (d.out_features + d.row_grain - 1) / d.row_grain;
      const int64_t per = std::max<int64_t>(1, groups / (CHUNKS_PER_THREAD * team.size()));
      for (int64_t g = 0; g < groups; g += per)
        chunks.push_back({int64_t(s), g * d.row_grain, std::min((g + per) * d.row_grain, d.out_features), col});
      col += d.out_features;
    }
    linear = &L;
    y = out;
    team.run(&Step::linear_chunk, this, int64_t(chunks.size()));
  }

  static void linear_chunk(void* self, int64_t c) {
    const Step& S = *static_cast<const Step*>(self);
    const Chunk& k = S.chunks[c];
    const kvyard_native_linear& d = *S.linear->segments[k.segment];
    d.rows(d.ctx, S.scratch(k.segment), S.a.B, S.y + k.col, S.linear->out, k.r0, k.r1);
  }

  void attention(const Layer& L) {
    layer = &L;
    if (a.shared_rows) {
      team.run(&Step::write_chunk, this, a.B * L.kv_heads);
      team.run(&Step::attend_chunk, this, a.B * L.kv_heads);
    } else {
      team.run(&Step::pair_chunk, this, a.B * L.kv_heads);
    }
  }

  // Rotary and the KV write of one (row, kv head) pair, then its attention.
  static void pair_chunk(void* self, int64_t p) {
    write_chunk(self, p);
    attend_chunk(self, p);
  }

  static void attend_chunk(void* self, int64_t p) {
    const Step& S = *static_cast<const Step*>(self);
    const Layer& L = *S.layer;
    const StepArgs& a = S.a;
    L.attention->pairs(L.attention->ctx, ptr(S.P.q), a.table, a.table_stride, a.rows, a.lens, a.B, ptr(S.P.attn), p, p + 1);
  }

  // Rotary of the pair's query heads and of its key head, its K/V written to the pool.
  static void write_chunk(void* self, int64_t p) {
    const Step& S = *static_cast<const Step*>(self);
    const Layer& L = *S.layer;
    const StepArgs& a = S.a;
    const int64_t H = L.heads, Hkv = L.kv_heads, D = L.head_dim, G = H / Hkv, ldq = L.linears[QKV].out;
    const int64_t b = p / Hkv, g = p % Hkv;
    const T* row = ptr(S.P.qkv) + b * ldq;
    const T* cos = static_cast<const T*>(a.cos) + b * a.cs_stride;
    const T* sin = static_cast<const T*>(a.sin) + b * a.cs_stride;
    T* q = ptr(S.P.q);
    for (int64_t h = g * G; h < (g + 1) * G; ++h) rotary_head<T>(row + h * D, cos, sin, D, q + (b * H + h) * D);
    const int64_t slot = (a.loc[b] * Hkv + g) * D;
    rotary_head<T>(row + (H + g) * D, cos, sin, D, ptr(L.k_buf) + slot);
    std::memcpy(ptr(L.v_buf) + slot, row + (H + Hkv + g) * D, D * sizeof(T));
  }

  // out = rmsnorm(src (+ residual, stored back into residual)), as kvyard_cpu_ops::rmsnorm.
  void rmsnorm(const T* src, T* residual, const at::Tensor& w, T* out) {
    const int64_t n = P.hidden;
    float* squares = P.squares.data_ptr<float>();
    for (int64_t t = 0; t < a.B; ++t)
      add_residual_and_square<T>(src + t * n, residual ? residual + t * n : nullptr, n,
                                 residual ? residual + t * n : nullptr, squares + t * n);
    float* sums = P.sums.data_ptr<float>();
    if (P.sum_lanes == 16) {
      for (int64_t t = 0; t < a.B; ++t) sums[t] = aten_order_sum<16>(squares + t * n, n);
    } else if (P.sum_lanes == 8) {
      for (int64_t t = 0; t < a.B; ++t) sums[t] = aten_order_sum<8>(squares + t * n, n);
    } else {
      at::Tensor view = P.sums.narrow(0, 0, a.B);
      at::sum_out(view, P.squares.narrow(0, 0, a.B), {1});
    }
    for (int64_t t = 0; t < a.B; ++t)
      normalize_row<T>(residual ? residual + t * n : src + t * n, w.data_ptr<T>(), sums[t], float(P.eps), n,
                       out + t * n);
  }
};

// A step whose master spent more than WAIT_PERCENT of it waiting for helpers (preempted mid-chunk,
// stage after stage: fewer free cores than threads) sends the next steps solo: SOLO_FIRST of them,
// doubling up to SOLO_MAX while the team keeps waiting that long when it is tried again. On a
// quiet machine the wait is the stages' tail imbalance, a few percent.
constexpr uint64_t WAIT_PERCENT = 25;
constexpr int64_t SOLO_FIRST = 8, SOLO_MAX = 512;

template <class T>
void run_step(Plan& P, const StepArgs& args) {
  Team& team = P.team;
  const bool solo = P.solo_left > 0;
  P.solo_left -= solo;
  team.take_wait_cycles();
  const uint64_t start = Team::now();
  team.session(std::max(1, at::get_num_threads()), solo, [&] { Step<T>(P, args).run(); });
  if (solo) return;
  const uint64_t total = Team::now() - start;
  if (team.take_wait_cycles() * 100 > total * WAIT_PERCENT) {
    P.solo_run = std::min(SOLO_MAX, P.solo_run > 0 ? 2 * P.solo_run : SOLO_FIRST);
    P.solo_left = P.solo_run;
  } else {
    P.solo_run = 0;
  }
}

at::Tensor step(int64_t id, const at::Tensor& h, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& loc,
                const at::Tensor& table, const at::Tensor& rows, const at::Tensor& lens, bool shared_rows) {
  Plan& P = plan_at(id);
  TORCH_CHECK(h.dim() == 2 && h.size(1) == P.hidden && h.is_contiguous() && h.scalar_type() == P.dtype,
              "native decode step: h must be a contiguous [B, ", P.hidden, "] ", P.dtype, " tensor");
  const int64_t B = h.size(0);
  TORCH_CHECK(B > 0 && B <= P.max_rows, "native decode step: ", B, " rows, the plan takes 1 to ", P.max_rows);
  const int64_t D = P.layers.empty() ? 0 : P.layers[0].head_dim;
  for (const at::Tensor* c : {&cos, &sin})
    TORCH_CHECK(c->dim() == 3 && c->size(0) == B && c->size(2) == D && c->stride(2) == 1 && c->stride(0) == sin.stride(0) &&
                    c->scalar_type() == P.dtype,
                "native decode step: cos/sin must be [", B, ", 1, ", D, "] ", P.dtype);
  TORCH_CHECK(loc.scalar_type() == at::kLong && loc.is_contiguous() && loc.numel() == B && rows.scalar_type() == at::kLong &&
                  rows.is_contiguous() && rows.numel() == B && lens.scalar_type() == at::kLong &&
                  lens.is_contiguous() && lens.numel() == B && table.scalar_type() == at::kInt && table.dim() == 2 &&
                  table.stride(1) == 1,
              "native decode step: loc, rows, lens int64 [B] and an int32 table expected");
  const int64_t slots = P.layers[0].k_buf.size(0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t s = loc.data_ptr<int64_t>()[b], r = rows.data_ptr<int64_t>()[b], n = lens.data_ptr<int64_t>()[b];
    TORCH_CHECK(s >= 0 && s < slots, "native decode step: slot ", s, " out of range");
    TORCH_CHECK(r >= 0 && r < table.size(0) && n >= 0 && n <= table.size(1), "native decode step: row ", b,
                " reads outside the req_to_token table");
  }
  std::lock_guard<std::mutex> guard(P.stepping);
  reserve(P, B);
  at::Tensor out = at::empty({B, P.hidden}, h.options());
  const StepArgs args{h.data_ptr(), cos.data_ptr(), sin.data_ptr(), cos.stride(0), loc.data_ptr<int64_t>(),
                      table.data_ptr<int32_t>(), table.stride(0), rows.data_ptr<int64_t>(), lens.data_ptr<int64_t>(),
                      B, out.data_ptr(), shared_rows};
  if (P.dtype == at::kBFloat16) run_step<c10::BFloat16>(P, args);
  else run_step<float>(P, args);
  return out;
}

}  // namespace
}  // namespace kvyard_native_step

TORCH_LIBRARY_FRAGMENT(kvyard_decode, m) {
  m.def("native_plan_new(float eps, Tensor final_norm, int max_rows) -> int", &kvyard_native_step::plan_new);
  m.def("native_plan_free(int plan) -> ()", &kvyard_native_step::plan_free);
  m.def("native_plan_add_layer(int plan, Tensor in_norm, Tensor post_norm, Tensor k_buf, Tensor v_buf, "
        "int attention) -> ()", &kvyard_native_step::plan_add_layer);
  m.def("native_plan_add_segment(int plan, int layer, int which, int linear) -> ()",
        &kvyard_native_step::plan_add_segment);
  m.def("native_plan_check(int plan) -> int", &kvyard_native_step::plan_check);
  m.def("native_plan_sum_lanes(int plan) -> int", &kvyard_native_step::plan_sum_lanes);
  m.def("native_step(int plan, Tensor h, Tensor cos, Tensor sin, Tensor loc, Tensor table, Tensor rows, "
        "Tensor lens, bool shared_rows=False) -> Tensor", &kvyard_native_step::step);
}
