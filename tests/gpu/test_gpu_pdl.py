"""Programmatic dependent launch on a CUDA device of sm_90+ (skipped elsewhere): a decode layer's
chain of kernels, each launched as a dependent of the one before (rmsnorm with the residual
add, the int4 one-row GEMV, rotary with the KV write folded in (and, in one layer, rotary and KV
write apart), split decode attention and its reduce, SiLU-and-mul),
gives the bits of the same chain launched plainly, eagerly and replayed from a CUDA graph many
times (a kernel reading its input before the previous one finished would show as a mismatch).
"""
from __future__ import annotations

import pytest
import torch

from gpu_guard import require_gpu

require_gpu()
pytest.importorskip("triton")

from kvyard.kernels.triton_ops import activation, common, kv_write, rmsnorm, rotary  # noqa: E402
from kvyard.kernels.triton_ops import int4_gemm as i4  # noqa: E402
from kvyard.layers import quant_math as qm  # noqa: E402
from kvyard.layers.quantized_linear import int4_kernel_layout  # noqa: E402

DEV = "cuda"
BF = torch.bfloat16


def _int4(n, k):
    q = torch.randint(0, 16, (k, n), dtype=torch.int32, device=DEV)
    scales = (torch.rand(k // 128, n, device=DEV) * 0.02 + 0.001).to(BF)
    zeros = torch.randint(0, 16, (k // 128, n), device=DEV).to(torch.uint8)
    g_idx = torch.arange(k, dtype=torch.int32, device=DEV) // 128
    return (*int4_kernel_layout(qm.pack_int4_rows(q), scales, zeros), g_idx)


def _layer_chain(x, res, w, qkv_w, o_w, gu_w, down_w, cos, sin, k_buf, v_buf, loc, table, seq_lens, mid,
                 rotary_alone):
    from kvyard_plugins.attention.triton_kernels.decode_attention import decode_attention

    h, res = rmsnorm.rmsnorm(x, w, 1e-6, res)
    qkv = i4.int4_gemm(h, *qkv_w, 128)                         # [1, (32 + 8 + 8) * 128]
    qk, v = qkv[:, :40 * 128].view(1, 40, 128), qkv[:, 40 * 128:].view(1, 8, 128)
    if rotary_alone:
        qk = rotary.apply_rotary(qk, cos, sin)
        kv_write.write_kv(k_buf, v_buf, loc, qk[:, 32:], v)
    else:
        qk = rotary.rotate_and_store(qk, cos, sin, v, loc, k_buf, v_buf)
    attn = torch.empty(1, 32, 128, device=DEV, dtype=BF)
    decode_attention(qk[:, :32], k_buf, v_buf, attn, table, torch.zeros(1, dtype=torch.int64, device=DEV),
                     seq_lens, *mid, 128 ** -0.5)
    x = i4.int4_gemm(attn.view(1, -1), *o_w, 128)
    h, res = rmsnorm.rmsnorm(x, w, 1e-6, res)
    x = i4.int4_gemm(activation.silu_and_mul(i4.int4_gemm(h, *gu_w, 128)), *down_w, 128)
    return x, res


def test_dependent_chain_equals_plain_launches(monkeypatch):
    if not common.pdl_ok(torch.empty(0, device=DEV)):
        pytest.skip("programmatic dependent launch needs sm_90+ and Triton's gdc ops")
    from kvyard_plugins.attention.triton_kernels.decode_attention import decode_workspace

    torch.manual_seed(0)
    weights = dict(w=torch.rand(4096, device=DEV, dtype=BF) + 0.5, qkv_w=_int4(6144, 4096), o_w=_int4(4096, 4096),
                   gu_w=_int4(2 * 14336, 4096), down_w=_int4(4096, 14336))
    ctx = 300
    cos, sin = (torch.rand(1, 128, device=DEV, dtype=BF) for _ in range(2))
    table = torch.randperm(1024, device=DEV)[:ctx].to(torch.int32).view(1, ctx)
    state = dict(cos=cos, sin=sin, loc=table[0, -1:].long(), table=table,
                 seq_lens=torch.tensor([ctx], device=DEV), mid=decode_workspace(1, 32, 8, 128, torch.float32, DEV))
    x0, r0 = (torch.randn(1, 4096, device=DEV, dtype=BF) for _ in range(2))
    k0, v0 = (torch.randn(1024, 8, 128, device=DEV, dtype=BF) for _ in range(2))
    k_buf, v_buf = k0.clone(), v0.clone()
    args = dict(weights, **state, k_buf=k_buf, v_buf=v_buf)

    def three_layers():         # layer after layer: each input the previous output
        out = x0, r0
        for i in range(3):
            out = _layer_chain(*out, **args, rotary_alone=i == 1)
        return out

    def eager(pdl: bool):
        monkeypatch.setattr(common, "PDL_ENABLED", pdl)
        k_buf.copy_(k0), v_buf.copy_(v0)
        return [t.clone() for t in (*three_layers(), k_buf)]

    def replays(pdl: bool, times: int = 20):
        monkeypatch.setattr(common, "PDL_ENABLED", pdl)
        three_layers()          # compile outside the capture
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = three_layers()
        for _ in range(times):
            k_buf.copy_(k0), v_buf.copy_(v0)
            g.replay()
            yield [t.clone() for t in (*out, k_buf)]

    plain = eager(False)
    assert all(torch.isfinite(t).all() for t in plain)
    assert all(torch.equal(a, b) for a, b in zip(eager(True), plain)), "eager PDL chain differs"
    for pdl in (False, True):
        for replay in replays(pdl):
            assert all(torch.equal(a, b) for a, b in zip(replay, plain)), f"pdl={pdl}: a replay differs"
