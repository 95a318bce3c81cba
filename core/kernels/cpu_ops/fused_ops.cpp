// Fused elementwise ops for small CPU batches (decode), where a chain of ATen calls costs more in
// dispatch than in arithmetic. Each op is one call with the torch path's order of operations
// (layers/norm.py, layers/rotary.py, layers/activation.py, mem_cache/kv_pool.py), rounding to
// the activation dtype where the torch path rounds: rmsnorm, rotary and kv_write are bitwise the
// torch path's; so is silu_and_mul on AVX2 builds (it calls the Sleef exp ATen uses; elsewhere
// the C library's, within 1 ulp).
// The per-row arithmetic is layer_ops.h's (shared with the native decode step). Built with
// -ffp-contract=off: a*b+c rounds twice, as the ATen kernels do.
//
//   rmsnorm(x [T, N], w [N], eps, residual [T, N]?) -> (normed [T, N], summed [T, N] or empty)
//       summed = x + residual (dtype); normed = (f32(summed) * rsqrt(mean(f32^2) + eps)).to(dtype) * w
//   rotary(x [T, H, D], cos [T, 1, D], sin [T, 1, D]) -> [T, H, D]
//       out = x * cos + rotate_half(x) * sin, rotate_half(x) = [-x[D/2:], x[:D/2]]
//   silu_and_mul(x [T, 2d]) -> [T, d] = silu(x[:, :d]) * x[:, d:]
//   kv_write(k_buf [S, Hkv, D], v_buf, loc int64 [T], k [T, Hkv*D], v [T, Hkv*D])  (in place)
//
// Inputs may have any row stride; within a row (and within a head for rotary) elements are
// contiguous. Dtypes: float32 or bfloat16, the same for all tensors of one call. Rows are split
// over ATen's pool only when there are enough of them to pay for the fork/join.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "layer_ops.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

namespace kvyard_cpu_ops {
namespace {

using namespace kvyard_layer_ops;

constexpr int64_t PARALLEL_ELEMENTS = 1 << 16;   // below this much work a call stays on one thread

template <class Fn>
void for_rows(int64_t rows, int64_t width, const Fn& fn) {
  const int64_t grain = std::max<int64_t>(1, PARALLEL_ELEMENTS / std::max<int64_t>(1, width));
  if (rows <= grain) {
    fn(0, rows);
    return;
  }
  at::parallel_for(0, rows, grain, fn);
}

template <class Fn>
void dispatch_dtype(const at::Tensor& t, const char* op, const Fn& fn) {
  if (t.scalar_type() == at::kFloat)
    fn(float{});
  else if (t.scalar_type() == at::kBFloat16)
    fn(c10::BFloat16{});
  else
    TORCH_CHECK(false, "kvyard_cpu_ops.", op, ": float32 or bfloat16 expected, got ", t.scalar_type());
}

void check_rows(const at::Tensor& t, const at::Tensor& like, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.stride(1) == 1, "kvyard_cpu_ops: ", what,
              " must be a CPU [rows, width] tensor with contiguous rows");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "kvyard_cpu_ops: ", what, " dtype ",
              t.scalar_type(), " differs from ", like.scalar_type());
}

// ---- rmsnorm ----------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> rmsnorm(const at::Tensor& x, const at::Tensor& w, double eps,
                                           const std::optional<at::Tensor>& residual) {
  check_rows(x, x, "x");
  const int64_t T = x.size(0), N = x.size(1);
  TORCH_CHECK(w.is_contiguous() && w.dim() == 1 && w.size(0) == N && w.scalar_type() == x.scalar_type(),
              "kvyard_cpu_ops.rmsnorm: weight must be a contiguous [", N, "] ", x.scalar_type(), " tensor");
  if (residual) {
    check_rows(*residual, x, "residual");
    TORCH_CHECK(residual->size(0) == T && residual->size(1) == N, "kvyard_cpu_ops.rmsnorm: residual shape");
  }
  at::Tensor out = at::empty({T, N}, x.options());
  at::Tensor summed = residual ? at::empty({T, N}, x.options()) : at::empty({0}, x.options());
  at::Tensor squares = at::empty({T, N}, x.options().dtype(at::kFloat));
  dispatch_dtype(x, "rmsnorm", [&](auto tag) {
    using T_ = decltype(tag);
    const T_* rp = residual ? residual->data_ptr<T_>() : nullptr;
    for_rows(T, N, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        add_residual_and_square<T_>(x.data_ptr<T_>() + t * x.stride(0), rp ? rp + t * residual->stride(0) : nullptr,
                                    N, residual ? summed.data_ptr<T_>() + t * N : nullptr,
                                    squares.data_ptr<float>() + t * N);
    });
    const at::Tensor sums = at::sum(squares, {1});
    for_rows(T, N, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const T_* src = residual ? summed.data_ptr<T_>() + t * N : x.data_ptr<T_>() + t * x.stride(0);
        normalize_row<T_>(src, w.data_ptr<T_>(), sums.data_ptr<float>()[t], float(eps), N,
                          out.data_ptr<T_>() + t * N);
      }
    });
  });
  return {out, summed};
}

// ---- rotary -----------------------------------------------------------------------------------

at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0,
              "kvyard_cpu_ops.rotary: x must be a CPU [T, H, D] tensor with contiguous heads, D even");
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2);
  for (const at::Tensor* c : {&cos, &sin})
    TORCH_CHECK(c->dim() == 3 && c->size(0) == T && c->size(2) == D && c->stride(2) == 1 &&
                    c->scalar_type() == x.scalar_type(),
                "kvyard_cpu_ops.rotary: cos/sin must be [", T, ", 1, ", D, "] ", x.scalar_type());
  at::Tensor out = at::empty({T, H, D}, x.options());
  dispatch_dtype(x, "rotary", [&](auto tag) {
    using T_ = decltype(tag);
    for_rows(T, H * D, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t h = 0; h < H; ++h)
          rotary_head<T_>(x.data_ptr<T_>() + t * x.stride(0) + h * x.stride(1),
                          cos.data_ptr<T_>() + t * cos.stride(0), sin.data_ptr<T_>() + t * sin.stride(0), D,
                          out.data_ptr<T_>() + (t * H + h) * D);
    });
  });
  return out;
}

// ---- silu_and_mul -----------------------------------------------------------------------------

at::Tensor silu_and_mul(const at::Tensor& x) {
  check_rows(x, x, "x");
  TORCH_CHECK(x.size(1) % 2 == 0, "kvyard_cpu_ops.silu_and_mul: the last dim must be even");
  const int64_t T = x.size(0), d = x.size(1) / 2;
  at::Tensor out = at::empty({T, d}, x.options());
  dispatch_dtype(x, "silu_and_mul", [&](auto tag) {
    using T_ = decltype(tag);
    for_rows(T, d, [&](int64_t t0, int64_t t1) {
      std::vector<float> scratch(d);
      for (int64_t t = t0; t < t1; ++t) {
        const T_* row = x.data_ptr<T_>() + t * x.stride(0);
        silu_and_mul_row<T_>(row, row + d, d, scratch.data(), out.data_ptr<T_>() + t * d);
      }
    });
  });
  return out;
}

// ---- kv_write ---------------------------------------------------------------------------------

void kv_write(at::Tensor& k_buf, at::Tensor& v_buf, const at::Tensor& loc, const at::Tensor& k,
              const at::Tensor& v) {
  check_rows(k, k_buf, "k");
  check_rows(v, v_buf, "v");
  TORCH_CHECK(k_buf.is_contiguous() && v_buf.is_contiguous() && loc.scalar_type() == at::kLong &&
                  loc.is_contiguous() && loc.device().is_cpu(),
              "kvyard_cpu_ops.kv_write: contiguous pools and a CPU int64 loc expected");
  const int64_t T = loc.size(0), S = k_buf.size(0);
  const int64_t width = k_buf.numel() / std::max<int64_t>(1, S);
  TORCH_CHECK(k.size(0) == T && v.size(0) == T && k.size(1) == width && v.size(1) == width,
              "kvyard_cpu_ops.kv_write: k/v must be [", T, ", ", width, "]");
  const int64_t* slots = loc.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(slots[t] >= 0 && slots[t] < S, "kvyard_cpu_ops.kv_write: slot ", slots[t], " out of range");
  const int64_t row_bytes = width * k.element_size();
  auto* kb = static_cast<char*>(k_buf.data_ptr());
  auto* vb = static_cast<char*>(v_buf.data_ptr());
  const auto* kp = static_cast<const char*>(k.data_ptr());
  const auto* vp = static_cast<const char*>(v.data_ptr());
  const int64_t ks = k.stride(0) * k.element_size(), vs = v.stride(0) * v.element_size();
  for_rows(T, width, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      std::memcpy(kb + slots[t] * row_bytes, kp + t * ks, row_bytes);
      std::memcpy(vb + slots[t] * row_bytes, vp + t * vs, row_bytes);
    }
  });
}

}  // namespace
}  // namespace kvyard_cpu_ops

TORCH_LIBRARY(kvyard_cpu_ops, m) {
  m.def("rmsnorm(Tensor x, Tensor weight, float eps, Tensor? residual) -> (Tensor, Tensor)");
  m.def("rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("kv_write(Tensor(a!) k_buf, Tensor(b!) v_buf, Tensor loc, Tensor k, Tensor v) -> ()");
}

TORCH_LIBRARY_IMPL(kvyard_cpu_ops, CPU, m) {
  m.impl("rmsnorm", &kvyard_cpu_ops::rmsnorm);
  m.impl("rotary", &kvyard_cpu_ops::rotary);
  m.impl("silu_and_mul", &kvyard_cpu_ops::silu_and_mul);
  m.impl("kv_write", &kvyard_cpu_ops::kv_write);
}
