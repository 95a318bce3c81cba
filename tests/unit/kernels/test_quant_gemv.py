"""The decode-sized int4 GEMV kernel (int4_gemm's split-K path) equals the float32 reference, in
the Triton CPU interpreter, for M = 1..16, several split-K counts (K not a multiple of the
split), sequential and act-order int4 groups; and the int4 layers route M <= 16 to it. (The fp8
GEMV: test_fp8_w8a16.py.)

Tolerance: float32 rtol/atol 1e-5 (the int4 products are exact in float32; only the order of
the float32 sums differs; the folded zero point at M <= 2: see its test); bfloat16 one unit in
the last place.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported anywhere in this process

import pytest
import torch

from kvyard.layers import quant_math as qm
from quant_helpers import layer_both_ways

pytest.importorskip("triton")

from kvyard.kernels.triton_ops import int4_gemm as i4             # noqa: E402
from kvyard.layers.quantized_linear import int4_kernel_layout    # noqa: E402
from kvyard.kernels.triton_ops.splitk import plan_split          # noqa: E402

F32 = dict(rtol=1e-5, atol=1e-5)
BF16 = dict(rtol=1.6e-2, atol=2e-2)


def test_zero_rows_give_empty_outputs():
    qweight, scales, zeros, g_idx = _int4(64, 256, 64, False, torch.float32)
    assert int4_gemm(torch.empty(0, 256), qweight, scales, zeros, g_idx, 64).shape == (0, 64)


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


def test_int4_layer_knows_sequential_groups():
    from kvyard.layers import quantized_linear as ql
    from kvyard.layers.linear import Linear

    layer = Linear(256, 64, method=ql.OnlineInt4LinearMethod(torch.float32, "cpu", 64))
    layer.load_shard(0, torch.randn(64, 256))
    layer.process_after_loading()
    assert layer.int4_group == 64
    # M <= 4 folds the zero point per word: float32 rounding of terms up to 32 s sum|x| (scales
    # ~0.25 for these randn rows, |y| ~ 16), about 1e-7 of sum|x||w|: atol 1e-4
    torch.testing.assert_close(*layer_both_ways(layer, torch.randn(2, 256)), rtol=1e-5, atol=1e-4)


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
