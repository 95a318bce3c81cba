"""The Triton int4 dequant-GEMM (kvyard.kernels.triton_ops.int4_gemm) and block-scaled fp8 GEMM
(kvyard.kernels.triton_ops.fp8_block_gemm) equal the dequantize-then-matmul path, in the Triton CPU interpreter, at batch 1 (the GEMV-shaped launch) and batch 37 (tiled),
for group sizes 32/64/128, symmetric and asymmetric zeros and a permuted (act-order) g_idx.
Tolerance: float32 1e-4 (the kernel sums in BLOCK_K chunks), bfloat16 one unit in the last place."""
import os

os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported anywhere in this process

import pytest
import torch

from kvyard.layers import quant_math as qm
from quant_helpers import layer_both_ways

pytest.importorskip("triton")


def _weights(n, k, group, act_order, symmetric, dtype):
    torch.manual_seed(group + n)
    q = torch.randint(0, 16, (k, n), dtype=torch.int32)
    groups = k // group
    scales = (torch.rand(groups, n) * 0.02 + 0.001).to(dtype)
    zeros = torch.full((groups, n), 8) if symmetric else torch.randint(0, 16, (groups, n))
    g_idx = torch.arange(k, dtype=torch.int32) // group
    if act_order:
        g_idx = g_idx[torch.randperm(k)]
    return qm.pack_int4_rows(q), scales, zeros.to(torch.uint8), g_idx


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 37])
@pytest.mark.parametrize("group,act_order,symmetric", [(32, False, True), (64, True, False), (128, False, False)])
def test_int4_gemm_equals_dequantized_matmul(m, group, act_order, symmetric, dtype):
    from kvyard.kernels.triton_ops.int4_gemm import int4_gemm
    from kvyard.layers.quantized_linear import int4_kernel_layout

    k, n = 256, 80
    qweight, scales, zeros, g_idx = _weights(n, k, group, act_order, symmetric, dtype)
    x = torch.randn(m, k, dtype=dtype)
    expected = (x.float() @ qm.dequantize_int4(qweight, scales, zeros, g_idx, torch.float32).t())
    got = int4_gemm(x, *int4_kernel_layout(qweight, scales, zeros), g_idx)
    assert got.dtype == dtype and got.shape == (m, n)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=2e-2)
    torch.testing.assert_close(got.float(), expected, **tol)


def test_int4_layer_takes_the_kernel_when_forced():
    from kvyard.layers.linear import Linear
    from kvyard_plugins.quantization.gptq_method import GPTQLinearMethod

    qweight, scales, zeros, g_idx = _weights(64, 128, 32, True, False, torch.float32)
    layer = Linear(128, 64, method=GPTQLinearMethod(torch.float32, "cpu", 32, v1_zeros=False))
    layer.load_tensor(0, "qweight", qweight)
    layer.load_tensor(0, "qzeros", qm.pack_int4_cols(zeros.to(torch.int32)))
    layer.load_tensor(0, "scales", scales)
    layer.load_tensor(0, "g_idx", g_idx)
    layer.process_after_loading()
    expected, got = layer_both_ways(layer, torch.randn(3, 128))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("m,block", [(1, 32), (37, 64), (5, 128)])
def test_fp8_block_gemm_equals_dequantized_matmul(m, block):
    """The block-scaled fp8 GEMM (kvyard.kernels.triton_ops.fp8_block_gemm) against dequantize-then-matmul
    in float32, K not a multiple of the block (masked tail)."""
    from kvyard.kernels.triton_ops.fp8_block_gemm import fp8_block_gemm

    torch.manual_seed(m + block)
    k, n = 200, 72
    xq, sx = qm.fp8_per_token_group(torch.randn(m, k), block)
    wq, sw_row = qm.fp8_per_token_group(torch.randn(n, k) * 0.05, block)   # per-row block scales
    expected = qm.dequantize_block(xq, sx, block) @ qm.dequantize_block(wq, sw_row, block).t()
    got = fp8_block_gemm(xq, sx, wq, sw_row, block, torch.float32)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_block_fp8_layer_takes_the_kernel_when_forced():
    from kvyard.layers.linear import Linear
    from kvyard.layers import quantized_linear as ql

    torch.manual_seed(3)
    k = 96
    method = ql.Fp8LinearMethod(torch.float32, "cpu", ql.Fp8Scheme("block", "dynamic", (32, 32), scale_name="weight_scale_inv"))
    layer = Linear(k, [64, 32], method=method)
    for shard, rows in enumerate((64, 32)):
        w = torch.randn(rows, k) * 0.05
        q, scale = qm.fp8_per_token_group(w, 32)                        # per-row scales [rows, 3]
        block_scale = scale.view(rows // 32, 32, -1).amax(1)             # one per 32 x 32 block
        layer.load_tensor(shard, "weight", qm.fp8_quantize(w, block_scale.repeat_interleave(32, 0).repeat_interleave(32, 1)))
        layer.load_tensor(shard, "weight_scale_inv", block_scale)
    layer.process_after_loading()
    expected, got = layer_both_ways(layer, torch.randn(20, k))     # > 16 rows: the w8a8 block GEMM
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
