"""Extend (prefill) attention over the paged KV pool, one launch for a mixed-length batch.

Request b has P_b cached tokens and N_b new ones; its new tokens' k/v are already in the pool
(the backend writes them first), so all P_b + N_b keys are read through the page table:
key j of request b is slot ``req_to_token[req_pool_indices[b], j]``. New token i sits at
position P_b + i and sees keys 0 .. P_b + i (causal inside the new tokens, full over the prefix).

Grid (B, H, ceil(max N_b / BLOCK_M)): one program per (request, query head, block of BLOCK_M new
tokens); blocks past a short request's N_b return at once. GQA: query head h reads kv head
h // GROUP. Online softmax in float32 with exp2 (the scale is pre-multiplied by log2(e)).

Tree mask (speculative tree verify): with TREE, request b's new token i sees new key j (j <= i)
only where ``tree_mask[tree_start[b] + i * N_b + j]`` is 1; prefix keys stay visible. The
causal loop bound is unchanged (ancestors precede their descendants).

Layer features: ``window`` W > 0 also hides keys j <= position - W (sliding window; 0 = none);
``logit_cap`` c > 0 turns the scaled score s into c * tanh(s / c) before the mask (SOFT_CAP).

Shapes: q [T, H, D] (rows may be strided, last dim contiguous), out [T, H, D];
k_buf/v_buf [num_slots, Hkv, D]; req_to_token [R, C] int32; per-request vectors [B] int64.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvyard_plugins.attention.triton_kernels.precision import fp8_kv, fp32_dot, scaled_scores


@triton.jit
def _extend_kernel(Q, K_BUF, V_BUF, O, REQ_TO_TOKEN, REQ_POOL_INDICES, Q_START, Q_LENS, PREFIX_LENS,
                   TREE_MASK, TREE_START, scale_log2, window, logit_cap,
                   stride_qt, stride_qh, stride_kbs, stride_kbh, stride_vbs, stride_vbh,
                   stride_ot, stride_oh, stride_req,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP32_DOT: tl.constexpr, KV_FP8: tl.constexpr,
                   SOFT_CAP: tl.constexpr, TREE: tl.constexpr):
    b = tl.program_id(0)
    head = tl.program_id(1)
    m_block = tl.program_id(2)
    q_len = tl.load(Q_LENS + b)
    if m_block * BLOCK_M >= q_len:      # a shorter request of a mixed batch
        return
    q_start = tl.load(Q_START + b)
    prefix = tl.load(PREFIX_LENS + b)
    tree_start = 0
    if TREE:
        tree_start = tl.load(TREE_START + b)
    table_row = REQ_TO_TOKEN + tl.load(REQ_POOL_INDICES + b).to(tl.int64) * stride_req
    kv_head = head // GROUP

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)   # index among the request's new tokens
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < q_len
    d_ok = offs_d < HEAD_DIM
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(Q + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if FP32_DOT:
        q = q.to(tl.float32)
    elif KV_FP8:        # precision.py: the fp8 cache converts to float16 in one step
        q = q.to(tl.float16)
    q_pos = prefix + offs_m                              # sequence position of each query

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # causal: no key past the block's last query, and none past the sequence
    kv_end = tl.minimum(prefix + q_len, prefix + (m_block + 1) * BLOCK_M)
    for start_n in range(0, kv_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < kv_end
        slots = tl.load(table_row + offs_n, mask=n_ok, other=0).to(tl.int64)
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K_BUF + slots[:, None] * stride_kbs + kv_head * stride_kbh + offs_d[None, :],
                    mask=kv_mask, other=0.0).to(q.dtype)
        if FP32_DOT:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        allowed = n_ok[None, :] & (offs_n[None, :] <= q_pos[:, None])
        if TREE:   # new keys (offs_n >= prefix) only where the request's tree block says so
            new_key = offs_n - prefix
            in_tree = (new_key[None, :] >= 0) & allowed & m_ok[:, None]
            bits = tl.load(TREE_MASK + tree_start + offs_m[:, None] * q_len + new_key[None, :],
                           mask=in_tree, other=1)
            allowed = allowed & (bits != 0)
        if window > 0:
            allowed = allowed & (offs_n[None, :] > q_pos[:, None] - window)
        qk = tl.where(allowed, scaled_scores(qk, scale_log2, logit_cap, SOFT_CAP), float("-inf"))

        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # a row with no key yet
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

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(O + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def extend_attention(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, out: torch.Tensor,
                     req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                     q_start: torch.Tensor, q_lens: torch.Tensor, prefix_lens: torch.Tensor,
                     max_q_len: int, scaling: float, window: int = 0, logit_cap: float = 0.0,
                     tree_mask: torch.Tensor | None = None, tree_start: torch.Tensor | None = None) -> None:
    """Writes out [T, H, D]. ``max_q_len`` (a host int) sizes the grid, so no device sync.
    tree_mask [sum N_b^2] uint8 and tree_start [B] int64 (kvyard.forward_batch.TreeMask): the
    tree-masked extend of a speculative verify step; None: causal."""
    _, heads, dim = q.shape
    kv_heads = k_buf.shape[1]
    if heads % kv_heads:
        raise ValueError(f"num_heads ({heads}) must be a multiple of num_kv_heads ({kv_heads})")
    if q.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("q and out need a contiguous last (head_dim) dimension")
    batch = q_lens.shape[0]
    if batch == 0 or max_q_len <= 0:
        return
    block_d = max(16, triton.next_power_of_2(dim))   # tl.dot needs K >= 16 on a GPU
    # Tiles shrink for wide heads (MLA's 576 -> 1024 padded) so Q, K and V tiles fit shared memory.
    block_m, block_n, stages = (64, 64 if block_d <= 64 else 32, 2) if block_d <= 256 else (16, 16, 1)
    grid = (batch, heads, triton.cdiv(max_q_len, block_m))
    _extend_kernel[grid](
        q, k_buf, v_buf, out, req_to_token, req_pool_indices, q_start, q_lens, prefix_lens,
        tree_mask if tree_mask is not None else q_lens, tree_start if tree_start is not None else q_lens,
        scaling * math.log2(math.e), int(window or 0), float(logit_cap or 0.0),
        q.stride(0), q.stride(1), k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1),
        out.stride(0), out.stride(1), req_to_token.stride(0),
        GROUP=heads // kv_heads, HEAD_DIM=dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        FP32_DOT=fp32_dot(q.dtype), KV_FP8=fp8_kv(k_buf), SOFT_CAP=bool(logit_cap), TREE=tree_mask is not None, num_warps=4 if block_d <= 64 else 8, num_stages=stages)
