// The decode step of a pre-norm decoder (Llama family) as one C++ loop over the layers, for small
// CPU batches where Python's per-op dispatch costs more than the arithmetic.
//
// A plan holds everything that is the same every step, given once: per layer the two RMSNorm
// weights, the KV pool buffers, and the calls that multiply each linear layer and run decode
// attention, each "op(x, *args)" through the dispatcher, so the quantization method and the
// attention plugin decide which kernel runs (the core does not know them); the final norm.
//
//   decode_step(plan, h [B, hidden], cos [B, 1, D], sin [B, 1, D], loc [B], table, rows [B], lens [B])
//       per layer:  x, residual = rmsnorm(h, in_norm, residual)        (residual = h at layer 0)
//                   qkv = qkv_proj(x)                                   [B, (H + 2 Hkv) D]
//                   qk = rotary(qkv[:, :(H + Hkv) D] as [B, H + Hkv, D]); k, v into the pool at loc
//                   o = o_proj(attention(q [B, H, D], k_buf, v_buf, table, rows, lens, *args))
//                   x, residual = rmsnorm(o, post_norm, residual)
//                   h = down_proj(silu_and_mul(gate_up_proj(x)))
//       -> rmsnorm(h, final_norm, residual)                             [B, hidden]
//
// The same ops in the same order as the Python layers (kvyard.layers, plugins/models/llama_model.py)
// with the same kernels, so the result is bitwise the Python step's. A linear layer is one or more
// segment calls whose outputs are concatenated along the last dim, then an optional bias.
// Plans live in a table indexed by id until plan_free (plan_table.h).
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/ivalue.h>
#include <ATen/core/stack.h>
#include <ATen/ops/add.h>
#include <ATen/ops/cat.h>
#include <torch/library.h>

#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "plan_table.h"

namespace kvyard_decode {
namespace {

struct Call {   // op(x, *args) -> Tensor
  c10::OperatorHandle op;
  std::vector<c10::IValue> args;

  at::Tensor operator()(const at::Tensor& x) const {
    torch::jit::Stack stack;
    stack.reserve(args.size() + 1);
    stack.emplace_back(x);
    stack.insert(stack.end(), args.begin(), args.end());
    op.callBoxed(stack);
    return stack[0].toTensor();
  }
};

struct Linear {
  std::vector<Call> segments;
  c10::optional<at::Tensor> bias;   // added after the concatenation (a one-segment call adds its own)

  at::Tensor operator()(const at::Tensor& x) const {
    TORCH_CHECK(!segments.empty(), "decode_step: a linear layer of the plan has no segment");
    at::Tensor y;
    if (segments.size() == 1) {
      y = segments[0](x);
    } else {
      std::vector<at::Tensor> parts;
      for (const auto& s : segments) parts.push_back(s(x));
      y = at::cat(parts, -1);
    }
    return bias ? at::add(y, *bias) : y;
  }
};

enum Which { QKV = 0, O = 1, GATE_UP = 2, DOWN = 3 };

struct Layer {
  at::Tensor in_norm, post_norm, k_buf, v_buf;
  Linear linears[4];
  Call attention;   // (q [B, H, D], k_buf, v_buf, table, rows, lens, *args) -> [B, H, Dv]
  int64_t heads, kv_heads, head_dim;
};

struct Plan {
  double eps;
  at::Tensor final_norm;
  std::vector<Layer> layers;
};

kvyard_decode_plans::PlanTable<Plan> plans;

Plan& plan_at(int64_t id) { return plans.at(id); }

Call make_call(const std::string& qualified, const c10::List<c10::IValue>& args) {
  auto sep = qualified.find("::");
  TORCH_CHECK(sep != std::string::npos, "decode plan: op name '", qualified, "' is not namespace::name");
  auto dot = qualified.find('.', sep);
  std::string name = qualified.substr(0, dot);
  std::string overload = dot == std::string::npos ? "" : qualified.substr(dot + 1);
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), overload.c_str());
  std::vector<c10::IValue> values(args.begin(), args.end());
  return Call{op, std::move(values)};
}

// -- the fused layer ops (core/kernels/cpu_ops), looked up once -----------------------------
struct CoreOps {
  c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, double,
                                                               const c10::optional<at::Tensor>&)> rmsnorm;
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)> rotary;
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&)> silu_and_mul;
  c10::TypedOperatorHandle<void(at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&)> kv_write;
};

const CoreOps& core_ops() {
  static const CoreOps ops = [] {
    auto& d = c10::Dispatcher::singleton();
    return CoreOps{
        d.findSchemaOrThrow("kvyard_cpu_ops::rmsnorm", "")
            .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, double,
                                                      const c10::optional<at::Tensor>&)>(),
        d.findSchemaOrThrow("kvyard_cpu_ops::rotary", "")
            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(),
        d.findSchemaOrThrow("kvyard_cpu_ops::silu_and_mul", "").typed<at::Tensor(const at::Tensor&)>(),
        d.findSchemaOrThrow("kvyard_cpu_ops::kv_write", "")
            .typed<void(at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>()};
  }();
  return ops;
}

// -- plan building ------------------------------------------------------------------------------
int64_t plan_new(double eps, const at::Tensor& final_norm) {
  core_ops();   // fail here, not mid-step, when the fused ops are not loaded
  return plans.add(std::make_unique<Plan>(Plan{eps, final_norm, {}}));
}

void plan_free(int64_t id) { plans.free(id); }

void plan_add_layer(int64_t id, const at::Tensor& in_norm, const at::Tensor& post_norm, const at::Tensor& k_buf,
                    const at::Tensor& v_buf, int64_t heads, int64_t kv_heads, int64_t head_dim,
                    const std::string& attention_op, const c10::List<c10::IValue>& attention_args) {
  TORCH_CHECK(heads > 0 && kv_heads > 0 && head_dim > 0 && heads % kv_heads == 0, "decode plan: bad head counts");
  Layer layer{in_norm, post_norm, k_buf, v_buf, {}, make_call(attention_op, attention_args), heads, kv_heads, head_dim};
  plan_at(id).layers.push_back(std::move(layer));
}

void plan_add_segment(int64_t id, int64_t layer, int64_t which, const std::string& op,
                      const c10::List<c10::IValue>& args) {
  auto& layers = plan_at(id).layers;
  TORCH_CHECK(layer >= 0 && layer < static_cast<int64_t>(layers.size()) && which >= 0 && which < 4,
              "decode plan: no linear ", which, " in layer ", layer);
  layers[layer].linears[which].segments.push_back(make_call(op, args));
}

void plan_set_bias(int64_t id, int64_t layer, int64_t which, const at::Tensor& bias) {
  auto& layers = plan_at(id).layers;
  TORCH_CHECK(layer >= 0 && layer < static_cast<int64_t>(layers.size()) && which >= 0 && which < 4,
              "decode plan: no linear ", which, " in layer ", layer);
  layers[layer].linears[which].bias = bias;
}

// -- the step -----------------------------------------------------------------------------------
at::Tensor decode_step(int64_t id, const at::Tensor& h_in, const at::Tensor& cos, const at::Tensor& sin,
                       const at::Tensor& loc, const at::Tensor& table, const at::Tensor& rows,
                       const at::Tensor& lens) {
  const Plan& plan = plan_at(id);
  const CoreOps& ops = core_ops();
  TORCH_CHECK(h_in.dim() == 2, "decode_step: h [B, hidden] expected");
  const int64_t b = h_in.size(0);
  at::Tensor h = h_in, residual, x;
  bool first = true;
  for (const Layer& L : plan.layers) {
    if (first) {
      x = std::get<0>(ops.rmsnorm.call(h, L.in_norm, plan.eps, c10::nullopt));
      residual = h;
      first = false;
    } else {
      std::tie(x, residual) = ops.rmsnorm.call(h, L.in_norm, plan.eps, residual);
    }
    const int64_t d = L.head_dim, q_cols = L.heads * d, kv_cols = L.kv_heads * d;
    at::Tensor qkv = L.linears[QKV](x);                                        // [B, q | k | v]
    at::Tensor qk = ops.rotary.call(qkv.narrow(1, 0, q_cols + kv_cols).view({b, L.heads + L.kv_heads, d}), cos, sin);
    at::Tensor q = qk.narrow(1, 0, L.heads);                                  // [B, H, D]
    at::Tensor k = qk.narrow(1, L.heads, L.kv_heads).reshape({b, kv_cols});   // a view: rows of qk
    at::Tensor v = qkv.narrow(1, q_cols + kv_cols, kv_cols);
    at::Tensor k_buf = L.k_buf, v_buf = L.v_buf;
    ops.kv_write.call(k_buf, v_buf, loc, k, v);
    torch::jit::Stack stack;
    stack.reserve(L.attention.args.size() + 6);
    for (const at::Tensor& t : {q.contiguous(), L.k_buf, L.v_buf, table, rows, lens}) stack.emplace_back(t);
    stack.insert(stack.end(), L.attention.args.begin(), L.attention.args.end());
    L.attention.op.callBoxed(stack);
    at::Tensor attn = stack[0].toTensor();                                    // [B, H, Dv]
    at::Tensor o = L.linears[O](attn.reshape({b, -1}));
    std::tie(x, residual) = ops.rmsnorm.call(o, L.post_norm, plan.eps, residual);
    h = L.linears[DOWN](ops.silu_and_mul.call(L.linears[GATE_UP](x)));
  }
  if (first) return std::get<0>(ops.rmsnorm.call(h, plan.final_norm, plan.eps, c10::nullopt));
  return std::get<0>(ops.rmsnorm.call(h, plan.final_norm, plan.eps, residual));
}

}  // namespace
}  // namespace kvyard_decode

TORCH_LIBRARY(kvyard_decode, m) {
  m.def("plan_new(float eps, Tensor final_norm) -> int", &kvyard_decode::plan_new);
  m.def("plan_free(int plan) -> ()", &kvyard_decode::plan_free);
  m.def("plan_add_layer(int plan, Tensor in_norm, Tensor post_norm, Tensor k_buf, Tensor v_buf, int heads, "
        "int kv_heads, int head_dim, str attention_op, Any[] attention_args) -> ()", &kvyard_decode::plan_add_layer);
  m.def("plan_add_segment(int plan, int layer, int which, str op, Any[] args) -> ()",
        &kvyard_decode::plan_add_segment);
  m.def("plan_set_bias(int plan, int layer, int which, Tensor bias) -> ()", &kvyard_decode::plan_set_bias);
  m.def("decode_step(int plan, Tensor h, Tensor cos, Tensor sin, Tensor loc, Tensor table, Tensor rows, "
        "Tensor lens) -> Tensor", &kvyard_decode::decode_step);
}
