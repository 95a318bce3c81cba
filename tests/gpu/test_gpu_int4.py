"""The int4 kernel on a CUDA device (skipped elsewhere): the checks the CPU suite runs under the
Triton interpreter (tests/unit/kernels/test_int4_gemv.py), compiled for the GPU, where the
nibble extraction is inline PTX (the interpreter runs the Triton expression instead).

  * every DOT16 config (bf16 x only) at M 1 and 16, whole K and split in two, vs the float32
    reference;
  * every other config of every M bucket vs the float32 reference x @ ((q - z) * s)^T, sequential
    groups and the act-order gather, float32 x (exact products: float32 sum order only; the zero
    point folded per word at M <= 2 adds ~1e-7 s sum|x|);
  * the autotuned path at Llama-3.1-8B projection shapes, M 1..16 and a prefill size, bf16 x;
    replayed from a CUDA graph it gives the eager bits; a K split summed in the same launch
    equals the two-launch sum and replays three times with the same bits;
  * Int4LinearMethod on CUDA equals its own dequantize-then-matmul.
Tolerance: float32 1e-5 (1e-4 for the tf32 dot at M > 4 with bf16 x: one bf16 unit).
"""
from __future__ import annotations


import pytest
import torch

from gpu_guard import require_gpu

require_gpu()
pytest.importorskip("triton")

from kvyard.kernels.triton_ops import int4_gemm as i4  # noqa: E402
from kvyard.layers import quant_math as qm  # noqa: E402
from kvyard.layers.quantized_linear import int4_kernel_layout  # noqa: E402

DEV = "cuda"
F32 = dict(rtol=1e-5, atol=1e-5)
BF16 = dict(rtol=1.6e-2, atol=2e-2)
ROWS = {1: 1, 2: 2, 4: 3, 16: 11, 64: 70}


def _weights(n, k, group, act_order=False, dtype=torch.float32):
    q = torch.randint(0, 16, (k, n), dtype=torch.int32, device=DEV)
    scales = (torch.rand(k // group, n, device=DEV) * 0.02 + 0.001).to(dtype)
    zeros = torch.randint(0, 16, (k // group, n), device=DEV).to(torch.uint8)
    g_idx = torch.arange(k, dtype=torch.int32, device=DEV) // group
    if act_order:
        g_idx = g_idx[torch.randperm(k, device=DEV)]
    qweight = qm.pack_int4_rows(q)
    # the kernel multiplies (q - z) by the scale in float32 (exact); dequantize_int4 would round each
    # weight to the scales' dtype first (bf16: ~2e-2 apart after K = 4096 sums), so the reference
    # takes float32 scales of the same values
    dense = qm.dequantize_int4(qweight, scales.float(), zeros, g_idx, torch.float32)
    return (*int4_kernel_layout(qweight, scales, zeros), g_idx), dense


@pytest.mark.parametrize("bucket", sorted(i4.GEMV_CONFIGS))
def test_every_config_equals_float32_reference(bucket):
    torch.manual_seed(bucket)
    packed, dense = _weights(192, 1024, 128)
    gathered, dense_g = _weights(192, 1024, 128, act_order=True)
    x = torch.randn(ROWS[bucket], 1024, device=DEV)
    for cfg in (c for c in i4.GEMV_CONFIGS[bucket] if not c.kwargs["DOT16"]):     # float32 x
        if not cfg.kwargs["PIPE"]:
            got = i4.int4_gemm(x, *packed, 128, split=1, config=cfg)
            torch.testing.assert_close(got, x @ dense.t(), **F32, msg=lambda m: f"{cfg}: {m}")
        if cfg.kwargs["WPT"] > 1:     # one-group tiles: no gather; bf16 x read as uint32 pairs
            xb = x.bfloat16()
            for split in (1, 2):
                got = i4.int4_gemm(xb, *packed, 128, split=split, config=cfg)
                torch.testing.assert_close(got.float(), xb.float() @ dense.t(), **BF16,
                                           msg=lambda m: f"{cfg} bf16 split {split}: {m}")
            continue
        got = i4.int4_gemm(x, *gathered, 0, split=1, config=cfg)
        torch.testing.assert_close(got, x @ dense_g.t(), **F32, msg=lambda m: f"{cfg} gather: {m}")


@pytest.mark.parametrize("m", [2, 16])
def test_every_dot16_config_equals_float32_reference(m):
    """The DOT16 path (bf16 x, (q - z) exact in bf16 by the inline PTX, tensor-core dot, scale
    per tile): every DOT16 config of the bucket, group 128, against x @ W in float32. Tolerance:
    one bf16 unit of the output (the dot's float32 error is ~1e-6 of sum|x||w|)."""
    torch.manual_seed(m + 7)
    packed, dense = _weights(192, 1024, 128, dtype=torch.bfloat16)
    x = torch.randn(m, 1024, device=DEV, dtype=torch.bfloat16)
    expected = x.float() @ dense.t()
    for cfg in (c for c in i4.GEMV_CONFIGS[i4.m_bucket(m)] if c.kwargs["DOT16"]):
        for split in (1, 2):
            got = i4.int4_gemm(x, *packed, 128, split=split, config=cfg)
            torch.testing.assert_close(got.float(), expected, **BF16, msg=lambda s: f"{cfg} split {split}: {s}")


@pytest.mark.parametrize("k,n", [(4096, 6144), (14336, 4096), (4096, 28672)])
def test_autotuned_shapes_and_graph_replay(k, n):
    torch.manual_seed(k + n)
    packed, dense = _weights(n, k, 128, dtype=torch.bfloat16)
    for m in (1, 2, 4, 7, 16, 100):
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        got = i4.int4_gemm(x, *packed, 128)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), x.float() @ dense.t(), **BF16)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = i4.int4_gemm(x, *packed, 128)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(replayed, got)
    # one row took the one-row plan (its config, a split from the SM count; launched with PDL)
    config, split = i4._one_row_plan(torch.empty(1, k, device=DEV, dtype=torch.bfloat16), n, k, 128)
    assert config is i4.ONE_ROW_CONFIG and split == i4.one_row_split(n, k, i4.sm_count(torch.device(DEV)))


@pytest.mark.parametrize("k,n,split", [(4096, 6144, 2), (14336, 4096, None)])
def test_one_launch_split_k_replays_identically(k, n, split):
    """qkv shape with a forced split of 2 and the down shape at its default split (4 on an H100):
    the last split program of each tile sums the partials in the same launch; it equals the
    two-launch sum bit for bit, and three replays of one CUDA graph give those bits each time,
    every tile counter back at 0 after each."""
    from quant_helpers import assert_graph_replays

    torch.manual_seed(k - n)
    packed, _ = _weights(n, k, 128, dtype=torch.bfloat16)
    for m in (1, 4, 16):
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        eager = i4.int4_gemm(x, *packed, 128, split=split)
        assert torch.equal(eager, i4.int4_gemm(x, *packed, 128, split=split, fuse_reduce=False))
        assert_graph_replays(lambda: i4.int4_gemm(x, *packed, 128, split=split), eager)


def test_layer_on_cuda_equals_its_dequantized_matmul():
    from kvyard.layers import quantized_linear as ql
    from kvyard.layers.linear import Linear

    torch.manual_seed(3)
    layer = Linear(512, [256, 128], method=ql.OnlineInt4LinearMethod(torch.bfloat16, DEV, 128),
                   dtype=torch.bfloat16, device=DEV)
    for shard, rows in enumerate((256, 128)):
        layer.load_shard(shard, torch.randn(rows, 512) * 0.02)
    layer.process_after_loading()
    dense = layer.method.dequantize(layer).float()
    for m in (1, 3, 16, 40):
        x = torch.randn(m, 512, device=DEV, dtype=torch.bfloat16)
        torch.testing.assert_close(layer(x).float(), x.float() @ dense.t(), **BF16)
