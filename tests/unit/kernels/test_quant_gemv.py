"""The decode-sized quantized GEMV kernels (kvyard.kernels.triton_ops.fp8_gemv, int4_gemm's split-K
path) equal the float32 references, in the Triton CPU interpreter, for M = 1..16, several split-K
counts (K not a multiple of the split), dynamic and static fp8 activations, sequential and
act-order int4 groups; and the quantized linear layers route M <= 16 to them.

Tolerance: float32 rtol/atol 1e-5 (the fp8 and int4 products are exact in float32; only the
order of the float32 sums differs); bfloat16 one unit in the last place.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported anywhere in this process

import pytest
import torch

from kvyard.layers import quant_math as qm
from quant_helpers import layer_both_ways

pytest.importorskip("triton")

import triton                                                    # noqa: E402
import triton.language as tl                                     # noqa: E402

from kvyard.kernels.triton_ops import fp8_gemv as fg             # noqa: E402
from kvyard.kernels.triton_ops import int4_gemm as i4                 # noqa: E402
from kvyard.layers.quantized_linear import int4_kernel_layout    # noqa: E402
from kvyard.kernels.triton_ops.splitk import plan_split          # noqa: E402

F32 = dict(rtol=1e-5, atol=1e-5)
BF16 = dict(rtol=1.6e-2, atol=2e-2)


def _fp8_weight(n, k):
    wq, sw = qm.fp8_per_row(torch.randn(n, k) * 0.05)
    return wq, sw.view(n)


@pytest.mark.parametrize("m,k,n,split", [(1, 256, 64, None), (5, 300, 96, 3), (16, 512, 192, 4),
                                         (7, 384, 80, 1), (3, 512, 64, 3)])
def test_fp8_gemv_dynamic_equals_float32_emulation(m, k, n, split):
    torch.manual_seed(m * k + n)
    x = torch.randn(m, k) * 3
    x[0, :40] *= 1e-4            # small values: e4m3 subnormals after scaling
    wq, sw = _fp8_weight(n, k)
    xq, sx = qm.fp8_per_row(x)
    expected = (xq.float() @ wq.float().t()) * sx * sw
    got = fg.fp8_gemv(x, wq, sw, split=split)
    assert got.shape == (m, n) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, **F32)


def test_zero_rows_give_empty_outputs():
    wq, sw = _fp8_weight(64, 256)
    assert fg.fp8_gemv(torch.empty(0, 256), wq, sw).shape == (0, 64)
    qweight, scales, zeros, g_idx = _int4(64, 256, 64, False, torch.float32)
    assert int4_gemm(torch.empty(0, 256), qweight, scales, zeros, g_idx, 64).shape == (0, 64)


@pytest.mark.parametrize("m,split", [(1, 2), (9, None)])
def test_fp8_gemv_static_scale(m, split):
    torch.manual_seed(m)
    k, n = 320, 72
    x = torch.randn(m, k)
    wq, sw = _fp8_weight(n, k)
    scale = torch.tensor(0.004)                # saturates the largest values: the clamp matters
    expected = (qm.fp8_quantize(x, scale).float() @ wq.float().t()) * scale * sw
    torch.testing.assert_close(fg.fp8_gemv(x, wq, sw, scale, split=split), expected, **F32)


def test_fp8_gemv_bfloat16_activations():
    torch.manual_seed(2)
    x = torch.randn(4, 256).bfloat16()
    wq, sw = _fp8_weight(96, 256)
    xq, sx = qm.fp8_per_row(x)
    expected = ((xq.float() @ wq.float().t()) * sx * sw).bfloat16()
    got = fg.fp8_gemv(x, wq, sw, split=2)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), **BF16)


@triton.jit
def _round_kernel(v_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, fg._round_to_e4m3(tl.load(v_ptr + offs)))


def test_e4m3_rounding_equals_torch_cast():
    """Every e4m3 value, every midpoint between neighbours (ties to even) and random values."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[grid.isfinite()].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    v = torch.cat([grid, mids, torch.randn(4000) * 60, torch.randn(1000) * 0.01]).clamp(-448, 448)
    v = torch.nn.functional.pad(v, (0, triton.next_power_of_2(v.numel()) - v.numel()))
    out = torch.empty_like(v)
    _round_kernel[(1,)](v, out, N=v.numel())
    assert torch.equal(out, v.to(torch.float8_e4m3fn).float())


@pytest.mark.parametrize("k,n_blocks,split", [(4096, 96, None), (320, 2, 3), (512, 1, 7), (128, 400, None)])
def test_split_plan_covers_k_without_empty_splits(k, n_blocks, split):
    plan = plan_split(k, n_blocks, 128, 132, split)
    assert plan.k_per_split % 128 == 0 and plan.split >= 1
    assert (plan.split - 1) * plan.k_per_split < k <= plan.split * plan.k_per_split


def int4_gemm(x, qweight, scales, zeros, g_idx, *args, **kwargs):
    """The kernel on canonical tensors (transposed to its layout)."""
    return i4.int4_gemm(x, *int4_kernel_layout(qweight, scales, zeros), g_idx, *args, **kwargs)


def int4_gemm_tiled(x, qweight, scales, zeros, g_idx):
    return i4.int4_gemm_tiled(x, *int4_kernel_layout(qweight, scales, zeros), g_idx)


def _int4(n, k, group, act_order, dtype):
    q = torch.randint(0, 16, (k, n), dtype=torch.int32)
    groups = k // group
    scales = (torch.rand(groups, n) * 0.02 + 0.001).to(dtype)
    zeros = torch.randint(0, 16, (groups, n), dtype=torch.uint8)
    g_idx = torch.arange(k, dtype=torch.int32) // group
    if act_order:
        g_idx = g_idx[torch.randperm(k)]
    return qm.pack_int4_rows(q), scales, zeros, g_idx


@pytest.mark.parametrize("m,k,n,group,act_order,split", [
    (1, 256, 64, 32, False, None), (5, 512, 96, 128, False, 3), (16, 384, 80, 64, True, 2),
    (7, 320, 64, 32, False, 3), (3, 512, 192, 256, False, 4), (2, 256, 64, 128, True, 1)])
def test_int4_gemv_equals_dequantized_matmul(m, k, n, group, act_order, split):
    torch.manual_seed(m + k + group)
    qweight, scales, zeros, g_idx = _int4(n, k, group, act_order, torch.float32)
    x = torch.randn(m, k)
    expected = x @ qm.dequantize_int4(qweight, scales, zeros, g_idx, torch.float32).t()
    for group_size in (0,) if act_order else (0, group):     # gathered, and scales read by row
        got = int4_gemm(x, qweight, scales, zeros, g_idx, group_size, split=split)
        torch.testing.assert_close(got, expected, **F32)


def test_int4_tiled_kernel_at_decode_sizes():
    """The tiled kernel (benchmarks compare it) still serves M <= 16 when called directly."""
    torch.manual_seed(7)
    qweight, scales, zeros, g_idx = _int4(80, 256, 64, False, torch.float32)
    x = torch.randn(3, 256)
    expected = x @ qm.dequantize_int4(qweight, scales, zeros, g_idx, torch.float32).t()
    torch.testing.assert_close(int4_gemm_tiled(x, qweight, scales, zeros, g_idx), expected, **F32)


def test_int4_gemv_bfloat16():
    torch.manual_seed(4)
    qweight, scales, zeros, g_idx = _int4(128, 256, 64, False, torch.bfloat16)
    x = torch.randn(3, 256).bfloat16()
    expected = x.float() @ qm.dequantize_int4(qweight, scales, zeros, g_idx, torch.float32).t()
    got = int4_gemm(x, qweight, scales, zeros, g_idx, 64, split=2)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, **BF16)


@pytest.fixture
def gemv_calls(monkeypatch):
    """The row counts fp8_gemv is called with."""
    calls = []
    real = fg.fp8_gemv
    monkeypatch.setattr(fg, "fp8_gemv", lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    return calls


@pytest.mark.parametrize("activation", ["dynamic", "static"])
def test_fp8_layer_routes_decode_sizes_to_the_gemv(gemv_calls, activation):
    from kvyard.layers import quantized_linear as ql
    from kvyard.layers.linear import Linear

    torch.manual_seed(5)
    k = 256
    layer = Linear(k, [64, 32], method=ql.Fp8LinearMethod(torch.float32, "cpu", ql.Fp8Scheme("tensor", activation)))
    for shard, rows in enumerate((64, 32)):
        wq, scale = qm.fp8_per_tensor(torch.randn(rows, k) * 0.05)
        layer.load_tensor(shard, "weight", wq)
        layer.load_tensor(shard, "weight_scale", scale)
        if activation == "static":
            layer.load_tensor(shard, "input_scale", torch.tensor(0.01 * (shard + 1)))
    layer.process_after_loading()
    for m in (1, 16, 17):                         # CPU: the float32 emulation path
        torch.testing.assert_close(*layer_both_ways(layer, torch.randn(m, k)), **F32)
    assert gemv_calls == [1, 16]                  # 17 rows keep the GEMM path


def test_int4_layer_knows_sequential_groups():
    from kvyard.layers import quantized_linear as ql
    from kvyard.layers.linear import Linear

    layer = Linear(256, 64, method=ql.OnlineInt4LinearMethod(torch.float32, "cpu", 64))
    layer.load_shard(0, torch.randn(64, 256))
    layer.process_after_loading()
    assert layer.int4_group == 64
    torch.testing.assert_close(*layer_both_ways(layer, torch.randn(2, 256)), **F32)


def test_int4_layer_gathers_act_order_groups():
    from kvyard.layers.linear import Linear
    from kvyard_plugins.quantization.gptq_method import GPTQLinearMethod

    torch.manual_seed(6)
    qweight, scales, zeros, g_idx = _int4(64, 128, 32, True, torch.float32)
    layer = Linear(128, 64, method=GPTQLinearMethod(torch.float32, "cpu", 32, v1_zeros=False))
    for name, t in (("qweight", qweight), ("qzeros", qm.pack_int4_cols(zeros.to(torch.int32))),
                    ("scales", scales), ("g_idx", g_idx)):
        layer.load_tensor(0, name, t)
    layer.process_after_loading()
    assert layer.int4_group == 0
    torch.testing.assert_close(*layer_both_ways(layer, torch.randn(4, 128)), **F32)
