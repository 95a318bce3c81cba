"""Decode attention over the paged KV pool: split-KV (flash-decoding) then a reduce launch.

Stage 1, grid (B, Hkv, S): program (b, g, s) takes the s-th of S contiguous key ranges of
request b (each range a multiple of BLOCK_N keys long, so short sequences leave the trailing
splits empty) and the GROUP query heads that share kv head g, stacked as the rows of one
[BLOCK_H, D] tile: every key is read once per kv head, however many query heads share it.
It writes the split's normalized partial output mid_o[b, h, s] and its log2-sum-exp
mid_lse[b, h, s] (-inf for an empty split, whose mid_o row is zeros).
Stage 2, grid (B, H): out[b, h] = sum_s 2^(lse_s - max) * mid_o_s / sum_s 2^(lse_s - max).

With S = 1 the one split's normalized output is the answer: stage 1 writes it straight into
out and stage 2 is not launched. (Stage 2 inside stage 1, the last-arriving split program
combining the splits, was measured on the H100 — Llama-3.1-8B, batch 1: 32 launches fewer a
step, 0.02 ms more kernel time, no gain end to end — and not kept.)

Only device tensors describe the batch (seq_lens, req_pool_indices): the grid depends on B and
S alone, so a CUDA graph captured at batch size B replays for any lengths. A row with
seq_len 0 (graph padding) gives zeros, never NaN.

Layer features: ``window`` W > 0 hides keys j < seq_len - W (the query sits at seq_len - 1);
``logit_cap`` c > 0 turns the scaled score s into c * tanh(s / c) (SOFT_CAP).

Shapes: q [B, H, D] (last dim contiguous), out [B, H, D]; mid_o [B, H, S, D] in float32 or the
activation dtype (--triton-attention-reduce-in-fp32), mid_lse [B, H, S] float32.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvyard.kernels.triton_ops.common import pdl_enter, pdl_launch
from kvyard_plugins.attention.triton_kernels.precision import fp8_kv, fp32_dot, scaled_scores


@triton.jit
def _decode_split_kernel(Q, K_BUF, V_BUF, REQ_TO_TOKEN, REQ_POOL_INDICES, SEQ_LENS, MID_O, MID_LSE,
                         scale_log2, window, logit_cap,
                         stride_qb, stride_qh, stride_kbs, stride_kbh, stride_vbs, stride_vbh,
                         stride_req, stride_mob, stride_moh, stride_mos, stride_mlb, stride_mlh,
                         GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
                         FP32_DOT: tl.constexpr, KV_FP8: tl.constexpr, SOFT_CAP: tl.constexpr,
                         PDL: tl.constexpr = False):
    pdl_enter(PDL)
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SEQ_LENS + b)
    table_row = REQ_TO_TOKEN + tl.load(REQ_POOL_INDICES + b).to(tl.int64) * stride_req
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_ok = offs_h < GROUP
    d_ok = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_h
    q = tl.load(Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=h_ok[:, None] & d_ok[None, :], other=0.0)
    if FP32_DOT:
        q = q.to(tl.float32)
    elif KV_FP8:        # precision.py: the fp8 cache converts to float16 in one step
        q = q.to(tl.float16)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        slots = tl.load(table_row + offs_n, mask=n_ok, other=0).to(tl.int64)
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K_BUF + slots[:, None] * stride_kbs + kv_head * stride_kbh + offs_d[None, :],
                    mask=kv_mask, other=0.0).to(q.dtype)
        if FP32_DOT:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        allowed = n_ok
        if window > 0:
            allowed = allowed & (offs_n >= seq_len - window)
        qk = tl.where(allowed[None, :], scaled_scores(qk, scale_log2, logit_cap, SOFT_CAP), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V_BUF + slots[:, None] * stride_vbs + kv_head * stride_vbh + offs_d[None, :],
                    mask=kv_mask, other=0.0).to(q.dtype)
        if FP32_DOT:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    mid = MID_O + b.to(tl.int64) * stride_mob + heads[:, None] * stride_moh + split * stride_mos
    tl.store(mid + offs_d[None, :], out.to(MID_O.dtype.element_ty), mask=h_ok[:, None] & d_ok[None, :])
    tl.store(MID_LSE + b.to(tl.int64) * stride_mlb + heads * stride_mlh + split, lse, mask=h_ok)


@triton.jit
def _decode_reduce_kernel(MID_O, MID_LSE, O, stride_mob, stride_moh, stride_mos, stride_mlb, stride_mlh,
                          stride_ob, stride_oh,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
                          BLOCK_S: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    b = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < NUM_SPLITS
    d_ok = offs_d < HEAD_DIM
    lse = tl.load(MID_LSE + b * stride_mlb + head * stride_mlh + offs_s, mask=s_ok, other=float("-inf"))
    top = tl.max(lse, 0)
    weights = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))   # empty splits weigh 0
    parts = tl.load(MID_O + b * stride_mob + head * stride_moh + offs_s[:, None] * stride_mos + offs_d[None, :],
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    total = tl.sum(weights, 0)
    out = tl.sum(weights[:, None] * parts, 0) / tl.where(total > 0, total, 1.0)
    tl.store(O + b * stride_ob + head * stride_oh + offs_d, out.to(O.dtype.element_ty), mask=d_ok)


def decode_workspace(batch: int, heads: int, num_splits: int, head_dim: int, mid_dtype: torch.dtype,
                     device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mid_o [batch, H, S, D] mid_dtype, mid_lse [batch, H, S] float32) for decode_attention."""
    return (torch.empty((batch, heads, num_splits, head_dim), dtype=mid_dtype, device=device),
            torch.empty((batch, heads, num_splits), dtype=torch.float32, device=device))


def decode_attention(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, out: torch.Tensor,
                     req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                     mid_o: torch.Tensor, mid_lse: torch.Tensor, scaling: float, window: int = 0,
                     logit_cap: float = 0.0) -> None:
    """Writes out [B, H, D]; mid_o/mid_lse are the workspace (decode_workspace, >= B rows)."""
    batch, heads, dim = q.shape
    kv_heads = k_buf.shape[1]
    if heads % kv_heads:
        raise ValueError(f"num_heads ({heads}) must be a multiple of num_kv_heads ({kv_heads})")
    if q.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("q and out need a contiguous last (head_dim) dimension")
    num_splits = mid_o.shape[2]
    if mid_o.shape[0] < batch or mid_o.shape[1] != heads or mid_o.shape[3] != dim:
        raise ValueError(f"mid_o shape {tuple(mid_o.shape)} does not fit batch {batch}, {heads} heads, head_dim {dim}")
    if batch == 0:
        return
    group = heads // kv_heads
    block_d = max(16, triton.next_power_of_2(dim))   # tl.dot needs K >= 16 on a GPU
    split_out = out.unsqueeze(2) if num_splits == 1 else mid_o      # [B, H, S, D]
    # Narrower key tiles for wide heads (MLA's 576 -> 1024 padded): K and V tiles fit shared memory.
    block_n, stages = (64, 2) if block_d <= 256 else (16, 1)
    _decode_split_kernel[(batch, kv_heads, num_splits)](
        q, k_buf, v_buf, req_to_token, req_pool_indices, seq_lens, split_out, mid_lse,
        scaling * math.log2(math.e), int(window or 0), float(logit_cap or 0.0),
        q.stride(0), q.stride(1), k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1),
        req_to_token.stride(0), split_out.stride(0), split_out.stride(1), split_out.stride(2),
        mid_lse.stride(0), mid_lse.stride(1),
        GROUP=group, HEAD_DIM=dim, BLOCK_D=block_d, BLOCK_H=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n, NUM_SPLITS=num_splits, FP32_DOT=fp32_dot(q.dtype), KV_FP8=fp8_kv(k_buf),
        SOFT_CAP=bool(logit_cap), num_warps=4, num_stages=stages, **pdl_launch(q))
    if num_splits == 1:
        return
    _decode_reduce_kernel[(batch, heads)](
        mid_o, mid_lse, out, mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1), out.stride(0), out.stride(1),
        HEAD_DIM=dim, BLOCK_D=block_d, NUM_SPLITS=num_splits,
        BLOCK_S=max(2, triton.next_power_of_2(num_splits)), num_warps=4, **pdl_launch(q))
