"""fp8 kernels on a CUDA device (skipped elsewhere): the checks the CPU suite runs under the
Triton interpreter (tests/unit/kernels/test_fp8_w8a16.py), compiled and autotuned for the GPU.

  * the w8a16 GEMV (kvyard.kernels.triton_ops.fp8_gemv) vs x.float() @ (w.float() * sw).T at
    Llama-3.1-8B projection shapes, M 1..16, per-channel and 128x128 block scales, bf16 x;
    replayed from a CUDA graph it gives the eager bits; a K split summed in the same launch
    equals the two-launch sum and replays three times with the same bits;
  * the one-launch activation quantization (fp8_quant) bit-identical to quant_math on the GPU;
  * the fp8 KV write (kv_write) bit-identical to the pool's torch expression;
  * the triton attention kernels over an fp8 cache (float16 operands) vs float32 attention;
  * Fp8LinearMethod on CUDA: M <= 16 -> the GEMV, M > 16 -> the quantization kernel +
    torch._scaled_mm, equal to the torch quantization + torch._scaled_mm.
Tolerance: bfloat16 output, one unit in the last place (2^-8 relative) plus float32 sum order.
"""
from __future__ import annotations


import pytest
import torch

from gpu_guard import require_gpu

require_gpu()
pytest.importorskip("triton")

from kvyard.kernels.triton_ops import fp8_gemv as fg  # noqa: E402
from kvyard.kernels.triton_ops import fp8_quant as fq  # noqa: E402
from kvyard.layers import quant_math as qm  # noqa: E402

DEV = "cuda"
BF16 = dict(rtol=1e-2, atol=1e-2)


def _weights(n, k, block):
    w = torch.randn(n, k, device=DEV) * 0.02
    if not block:
        wq, sw = qm.fp8_per_row(w)
        return wq, sw.view(n), wq.float() * sw
    wq, sw = qm.fp8_per_token_group(w, 128)        # per-row block scales, the layer's storage
    return wq, sw, qm.dequantize_block(wq, sw, 128)


@pytest.mark.parametrize("k,n", [(4096, 6144), (14336, 4096), (4096, 1024)])
@pytest.mark.parametrize("block", [False, True])
def test_w8a16_equals_float32_reference(k, n, block):
    torch.manual_seed(k + n)
    wq, sw, dense = _weights(n, k, block)
    for m in (1, 2, 7, 16):
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        got = fg.fp8_w8a16_gemv(x, wq, sw, 128 if block else 0)
        ref = x.float() @ dense.t()
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), ref, **BF16)
        assert torch.equal(fg.fp8_w8a16_gemv(x, wq, sw, 128 if block else 0), got)   # deterministic


def test_w8a16_in_a_cuda_graph_gives_the_eager_bits():
    from kvyard.executor.cuda_graph_runner import CudaGraphCapture

    torch.manual_seed(1)
    wq, sw, _ = _weights(6144, 4096, False)
    for m in (1, 16):
        x = torch.randn(m, 4096, device=DEV, dtype=torch.bfloat16)
        eager = fg.fp8_w8a16_gemv(x, wq, sw)
        graph = CudaGraphCapture()
        out = graph.capture(lambda: fg.fp8_w8a16_gemv(x, wq, sw))
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)


@pytest.mark.parametrize("block", [False, True])
def test_w8a16_one_launch_split_k_replays_identically(block):
    """N 1024 < SPLIT_BELOW_N: K split 2, summed by the last split program of each row block in
    the same launch; equal to the two-launch sum bit for bit, and three replays of one CUDA
    graph give those bits each time, every tile counter back at 0 after each."""
    from quant_helpers import assert_graph_replays

    torch.manual_seed(5)
    wq, sw, _ = _weights(1024, 4096, block)
    scale_k = 128 if block else 0
    assert fg.plan_split(1024, 4096)[0] > 1
    for m in (1, 16):
        x = torch.randn(m, 4096, device=DEV, dtype=torch.bfloat16)
        eager = fg.fp8_w8a16_gemv(x, wq, sw, scale_k)
        assert torch.equal(eager, fg.fp8_w8a16_gemv(x, wq, sw, scale_k, fuse_reduce=False))
        assert_graph_replays(lambda: fg.fp8_w8a16_gemv(x, wq, sw, scale_k), eager)


@pytest.mark.parametrize("m,k", [(1, 4096), (64, 4096), (1024, 14336), (3, 1300)])
def test_activation_quantization_is_bit_identical(m, k):
    torch.manual_seed(m)
    x = (torch.randn(m, k, device=DEV) * 3).bfloat16()
    x[0, :64] *= 1e-5                              # subnormals and -0 after scaling
    q, s = fq.per_token_fp8(x)
    q_ref, s_ref = qm.fp8_per_row(x)
    assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    scale = torch.tensor(0.004, device=DEV)        # saturates
    assert torch.equal(fq.static_fp8(x, scale).view(torch.uint8), qm.fp8_quantize(x, scale).view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_kv_write_is_bit_identical(dtype):
    from kvyard import kernels
    from kvyard.mem_cache.kv_pool import KVPool

    torch.manual_seed(2)
    t, heads, d = 37, 8, 128
    pools = [KVPool(64, 1, heads, d, dtype, DEV, scales=([0.004], [3.0])) for _ in range(2)]
    loc = torch.randperm(63, device=DEV)[:t] + 1
    k, v = ((torch.randn(t, heads, d, device=DEV) * 4).bfloat16() for _ in range(2))
    with kernels.force_triton(()):
        pools[0].set_kv(0, loc, k, v)
    pools[1].set_kv(0, loc, k, v)                   # CUDA: the Triton kernel
    for a, b in ((pools[0].k_buffer(0), pools[1].k_buffer(0)), (pools[0].v_buffer(0), pools[1].v_buffer(0))):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_fp8_layer_routes_by_rows():
    from kvyard.layers import quantized_linear as ql
    from kvyard.layers.linear import Linear

    torch.manual_seed(3)
    k = 4096
    layer = Linear(k, [2048, 1024], method=ql.Fp8LinearMethod(torch.bfloat16, DEV, ql.Fp8Scheme(checkpoint=False)))
    for shard, rows in enumerate((2048, 1024)):
        layer.load_tensor(shard, "weight", (torch.randn(rows, k) * 0.02).bfloat16())
    layer.process_after_loading()
    dense = layer.method.dequantize(layer)
    x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x).float(), x.float() @ dense.t(), **BF16)
    if not ql.use_scaled_mm(x):
        pytest.skip("no fp8 torch._scaled_mm on this device")
    x = torch.randn(40, k, device=DEV, dtype=torch.bfloat16)
    xq, sx = qm.fp8_per_row(x)
    ref = torch._scaled_mm(xq, layer.weight.t(), scale_a=sx, scale_b=layer.weight_scale.view(1, -1),
                           out_dtype=torch.bfloat16)
    assert torch.equal(layer(x), ref)


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16])
def test_triton_attention_over_an_fp8_cache(fp8):
    """The triton plugin's decode and extend kernels reading an fp8 cache with a bf16 q (the
    KV_FP8 path: q, keys, values, probabilities as float16; bfloat16: the plain cache) against
    float32 attention over the same values, at Llama-3.1-8B heads (32 / 8, head_dim 128) and
    1000-token contexts."""
    from kvyard_plugins.attention.triton_kernels import decode_attention as dec
    from kvyard_plugins.attention.triton_kernels import extend_attention as ext

    torch.manual_seed(4)
    heads, kv_heads, dim, lens = 32, 8, 128, [1000, 37, 513]
    k_buf = (torch.randn(sum(lens) + 1, kv_heads, dim, device=DEV) * 2).to(fp8)
    v_buf = (torch.randn(sum(lens) + 1, kv_heads, dim, device=DEV) * 2).to(fp8)
    table = torch.zeros(len(lens), max(lens), dtype=torch.int32, device=DEV)
    start = 1
    for i, n in enumerate(lens):
        table[i, :n] = torch.arange(start, start + n, dtype=torch.int32, device=DEV)
        start += n
    rows, seq_lens = torch.arange(len(lens), device=DEV), torch.tensor(lens, device=DEV)
    q = torch.randn(len(lens), heads, dim, device=DEV).bfloat16()
    want = []
    for i, n in enumerate(lens):
        keys = k_buf[table[i, :n].long()].float().repeat_interleave(heads // kv_heads, 1)     # [n, H, D]
        vals = v_buf[table[i, :n].long()].float().repeat_interleave(heads // kv_heads, 1)
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[i].float(), keys) * dim ** -0.5, dim=-1)
        want.append(torch.einsum("hn,nhd->hd", p, vals))
    want = torch.stack(want)
    out = torch.empty_like(q)
    mid_o, mid_lse = dec.decode_workspace(len(lens), heads, 8, dim, torch.float32, DEV)
    dec.decode_attention(q, k_buf, v_buf, out, table, rows, seq_lens, mid_o, mid_lse, dim ** -0.5)
    torch.testing.assert_close(out.float(), want, **BF16)
    out = torch.empty_like(q)
    ext.extend_attention(q, k_buf, v_buf, out, table, rows, torch.arange(len(lens), device=DEV),
                         torch.ones(len(lens), dtype=torch.int64, device=DEV), seq_lens - 1, 1, dim ** -0.5)
    torch.testing.assert_close(out.float(), want, **BF16)
