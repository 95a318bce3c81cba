"""Fused experts as two grouped GEMMs over tokens sorted by expert (block-aligned).

T tokens each pick k experts: N = T * k (token, expert) choices, choice c = t * k + j.

align_by_expert (torch, on the device, no host sync):
    choices are stably sorted by expert and each expert's run is padded to a multiple of BLOCK_M,
    so every BLOCK_M-row block of ``sorted_ids`` belongs to exactly one expert:
    sorted_ids   [N + E * (BLOCK_M - 1)] int32: choice ids, N (a sentinel) in the padding
    block_expert [len(sorted_ids) / BLOCK_M] int32: the expert of each block (E past the end)
    num_padded   [1] int32: used length of sorted_ids; blocks at or past it return at once
    The buffers have their worst-case size, so a CUDA graph captured at T tokens replays for any
    routing.

_grouped_gemm_kernel, grid (blocks, cdiv(N_out, BLOCK_N)): program (m, n) multiplies the rows
    of its block (rows of A: choice // A_DIV, A_DIV = k for x, 1 for the per-choice
    intermediate) by W[block_expert[m]] ([N_out, K], i.e. rows are output features) and writes
    C[choice, n-block], optionally times the choice's routing weight.

fused_experts: C1 = x @ w13[e].T [N, 2I]; act = silu(gate) * up [N, I]; C2 = act @ w2[e].T *
    weight [N, H]; out = C2.view(T, k, H).sum(1). Accumulation is float32; under float32 inputs
    (and always in the CPU interpreter) tl.dot runs as IEEE float32, not tf32.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BLOCK_M = 16


def align_by_expert(ids: torch.Tensor, num_experts: int, block_m: int = BLOCK_M
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [T, k] -> (sorted_ids, block_expert, num_padded); see the module docstring."""
    flat = ids.reshape(-1).to(torch.int64)
    n = flat.numel()
    dev = flat.device
    # scatter_add, not bincount: CUDA bincount reads the max id back to the host (no graphs)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    order = torch.argsort(flat, stable=True)                                # choices by expert
    experts_sorted = flat[order]
    first_of_expert = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n, device=dev) - first_of_expert[experts_sorted]
    capacity = n + num_experts * (block_m - 1)
    capacity = (capacity + block_m - 1) // block_m * block_m
    sorted_ids = torch.full((capacity,), n, dtype=torch.int32, device=dev)
    sorted_ids[starts[experts_sorted] + rank] = order.to(torch.int32)
    block_starts = torch.arange(0, capacity, block_m, device=dev)
    block_expert = torch.searchsorted(ends, block_starts, right=True).to(torch.int32)   # E past the end
    return sorted_ids, block_expert, ends[-1:].to(torch.int32)


@triton.jit
def _grouped_gemm_kernel(A, W, C, SORTED_IDS, BLOCK_EXPERT, NUM_PADDED, ROUTE_W,
                         num_choices, n_out, k_in,
                         stride_am, stride_we, stride_wn, stride_cm,
                         A_DIV: tl.constexpr, MUL_WEIGHT: tl.constexpr, FP32_DOT: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(NUM_PADDED):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    choice = tl.load(SORTED_IDS + offs_m)
    m_ok = choice < num_choices
    a_rows = (choice // A_DIV).to(tl.int64)
    expert = tl.load(BLOCK_EXPERT + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_out
    offs_k = tl.arange(0, BLOCK_K)
    w_base = W + expert * stride_we
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_in, BLOCK_K):
        k_ok = k0 + offs_k < k_in
        a = tl.load(A + a_rows[:, None] * stride_am + (k0 + offs_k)[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_base + offs_n[None, :] * stride_wn + (k0 + offs_k)[:, None],
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)         # [BLOCK_K, BLOCK_N]
        if FP32_DOT:
            acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a, w)
    if MUL_WEIGHT:
        route = tl.load(ROUTE_W + choice, mask=m_ok, other=0.0).to(tl.float32)
        acc = acc * route[:, None]
    tl.store(C + choice.to(tl.int64)[:, None] * stride_cm + offs_n[None, :],
             acc.to(C.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _grouped_gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, aligned, num_choices: int,
                  a_div: int, route_weights: torch.Tensor | None) -> None:
    sorted_ids, block_expert, num_padded = aligned
    n_out, k_in = w.shape[1], w.shape[2]
    block_n = min(64, max(16, triton.next_power_of_2(n_out)))
    block_k = min(64, max(16, triton.next_power_of_2(k_in)))
    fp32 = a.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET", "0") == "1"
    grid = (block_expert.numel(), triton.cdiv(n_out, block_n))
    _grouped_gemm_kernel[grid](
        a, w, out, sorted_ids, block_expert, num_padded,
        route_weights if route_weights is not None else out,
        num_choices, n_out, k_in, a.stride(0), w.stride(0), w.stride(1), out.stride(0),
        A_DIV=a_div, MUL_WEIGHT=route_weights is not None, FP32_DOT=fp32,
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k)


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                  ids: torch.Tensor) -> torch.Tensor:
    """x [T, H], w13 [E, 2I, H], w2 [E, H, I], weights/ids [T, k] -> [T, H] in x's dtype."""
    t, hidden = x.shape
    num_experts, two_i, _ = w13.shape
    top_k = ids.shape[1]
    if w2.shape != (num_experts, hidden, two_i // 2):
        raise ValueError(f"w2 shape {tuple(w2.shape)} does not match w13 {tuple(w13.shape)}")
    if x.stride(-1) != 1 or w13.stride(-1) != 1 or w2.stride(-1) != 1:
        raise ValueError("x, w13 and w2 need a contiguous last dim")
    n = t * top_k
    if n == 0:
        return torch.zeros_like(x)
    aligned = align_by_expert(ids, num_experts)
    gate_up = torch.empty((n, two_i), dtype=x.dtype, device=x.device)
    _grouped_gemm(x, w13, gate_up, aligned, n, top_k, None)
    from kvyard.kernels.triton_ops.activation import silu_and_mul
    act = silu_and_mul(gate_up)                                           # [N, I]
    down = torch.empty((n, hidden), dtype=x.dtype, device=x.device)
    _grouped_gemm(act, w2, down, aligned, n, 1, weights.reshape(-1).float().contiguous())
    return down.view(t, top_k, hidden).sum(dim=1)
