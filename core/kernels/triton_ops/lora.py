"""Triton kernels of LoRA serving (kvyard.lora): the segment-gather shrink and expand GEMMs.

One segment per request (its new tokens are contiguous in T); seg_indptr [B + 1] int32 token
offsets, seg_slots [B] int32 adapter slot per segment (-1: base model, skipped). Both kernels
read the indices from device tensors only, and their grid depends only on B, the slot count S,
the widths, the shapes and the host int ``max_seg_len`` — so a decode graph (max_seg_len 1)
captures them once and every replay serves whatever slots its buffers hold.

Programs own groups of rows (grid axis 1): a prefill segment is its own group (contiguous rows);
a decode batch (every segment at most one token, B <= MAX_SLOT_GROUPED) groups by adapter slot
instead, S groups whose rows each program gathers from seg_slots in-kernel (a cumsum over B) —
so a slot's A and B are read once per 16 rows, not once per request.

    shrink:  part[s, t, :]          = x[t, Ks] @ A[slot(t), :, Ks].T    A [S, N, K], N = n R
             (split-K: Ks = the s-th of SPLIT_K chunks of K, each its own program; float32)
    expand:  xa[t, :]                = sum_s part[s, t, :]                (fixed order)
             y[t, off_k:off_k+size_k] += xa[t, kR:(k+1)R] @ B[slot(t), off_k:off_k+size_k].T
                                                                            B [S, OUT, R]
Why split-K: at decode the shrink is a handful of rows against K = 4096..14336; one program per
row block walking all of K serially leaves the GPU idle (latency-bound). SPLIT_K programs per
tile each walk >= K_PER_SPLIT columns instead; SPLIT_K shrinks as the tiles grow (prefill: 1). The partial sums are reduced by the expand kernel
as it loads them (no third launch), in a fixed order: no atomics, results do not depend on
scheduling. Each element of part and y is written by exactly one program; accumulation in
float32; xa is rounded to B's dtype before the expand dot (as a stored xa would be).
Rows of base-model segments are left untouched in y and unwritten in part.

The fused form (kvyard.lora.hook: the shrink rode in the base GEMM, which wrote
h [T, S n R] = x @ A_all.T beside y in one y_ext row) needs only the expand, one launch:
    decode (one token per segment):  program (row t, column block), slot = seg_slots[t]
             y[t, c] += sum_r h[t, slot n R + shard(c) R + r] * B[slot, c, r]      (float32 sum)
             from DENSE_MIN_ROWS rows: program (row block, column block, slot), one dot over
             the block's rows of that slot (a program whose slot no row uses returns at once):
             a slot's B block comes from one read per row block (the per-row form read it once
             per row: 8 adapters at batch 64 moved 59 MB through L2 for gate_up alone), and the
             slots run in parallel (a loop over them inside one program ran 8 dependent rounds
             of loads: at batch 64 with 8 adapters that was slower than the per-row form)
    otherwise: the segment expand above with split-K 1, reading xa at column slot * n R + k R.
y may be a row-strided view (y_ext[:, :out]); only its last dim must be contiguous.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch
import triton
import triton.language as tl

from kvyard.kernels.triton_ops.splitk import PROGRAMS_PER_SM, plan_split, sm_count

BLOCK_M = 16
K_PER_SPLIT = 256     # columns of K per shrink program (4 BLOCK_K steps): split-K picks SPLIT_K from it
MAX_SPLIT_K = 64      # bounds the partial buffer and the expand's reduction
REDUCE_ELEMS = 4096   # float32 partials one expand program holds at once ([chunk, BLOCK_M, BLOCK_R]):
                      # sm_90 compiles rank 64 with a 512-row slot scan without spills
MAX_SLOT_GROUPED = 512   # decode batches up to this many rows group by slot ([BLOCK_B, BLOCK_M] in registers)
DECODE_TILE = 4096    # B elements one fused decode-expand program reads ([BLOCK_N, BLOCK_R]; R 16: 256 columns)
DENSE_MIN_ROWS = 16   # decode batches from this many rows take the dense expand (a row block and slot per program)
DENSE_TILE = 8192     # B elements per slot one dense-expand program holds ([BLOCK_N, BLOCK_R])


@triton.jit
def _group_rows(indptr_ptr, slots_ptr, num_segs, pid_m, BLOCK_M: tl.constexpr, BY_SLOT: tl.constexpr,
                BLOCK_B: tl.constexpr):
    """(slot, token rows [BLOCK_M] int64, row mask, live) of m-block ``pid_m`` of this program's
    group (grid axis 1). Segment mode: the group is a segment, its rows are contiguous. Slot mode
    (every segment at most one token, decode): the group is adapter slot g, its rows are the
    tokens of the segments with slot g, in segment order, gathered in-kernel from seg_slots.
    live: the slot is an adapter and the m-block holds a row."""
    g = tl.program_id(1)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if BY_SLOT:
        bs = tl.arange(0, BLOCK_B)
        b_ok = bs < num_segs
        first = tl.load(indptr_ptr + bs, mask=b_ok, other=0)
        match = (tl.load(slots_ptr + bs, mask=b_ok, other=-1) == g) & (tl.load(indptr_ptr + bs + 1, mask=b_ok,
                                                                                other=0) > first)
        order = tl.cumsum(match.to(tl.int32), axis=0) - 1       # [BLOCK_B] rank among the slot's tokens
        pick = match[:, None] & (order[:, None] == ms[None, :])  # [BLOCK_B, BLOCK_M] one-hot columns
        rows = tl.sum(tl.where(pick, first[:, None], 0), axis=0)
        slot = g
        count = tl.sum(match.to(tl.int32), axis=0)
    else:
        start = tl.load(indptr_ptr + g)
        rows = start + ms
        slot = tl.load(slots_ptr + g)
        count = tl.load(indptr_ptr + g + 1) - start
    return slot, rows.to(tl.int64), ms < count, (slot >= 0) & (pid_m * BLOCK_M < count)


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, part_ptr, indptr_ptr, slots_ptr, num_segs, N, K, k_per_split, split_k,
                   stride_xm, stride_as, stride_an, stride_ps, stride_pm,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   N_BLOCKS: tl.constexpr, BY_SLOT: tl.constexpr, BLOCK_B: tl.constexpr):
    """Program (tile * split_k + split, group): part[split, tile rows, tile cols]."""
    split = tl.program_id(0) % split_k
    tile = tl.program_id(0) // split_k
    slot, rows, row_ok, live = _group_rows(indptr_ptr, slots_ptr, num_segs, tile // N_BLOCKS, BLOCK_M,
                                           BY_SLOT, BLOCK_B)
    if not live:
        return
    cols = (tile % N_BLOCKS) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    a_base = a_ptr + slot.to(tl.int64) * stride_as
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_hi
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)     # [BLOCK_M, BLOCK_K]
        a = tl.load(a_base + cols[None, :] * stride_an + ks[:, None],
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)     # [BLOCK_K, BLOCK_N]
        acc += tl.dot(x, a)          # native dtype operands (bf16/fp16 tensor cores), float32 accumulator
    tl.store(part_ptr + split.to(tl.int64) * stride_ps + rows[:, None] * stride_pm + cols[None, :], acc,
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _reduce_partials(part_ptr, row_off, row_ok, col0, R, split_k, stride_ps, stride_pm,
                     BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT_CHUNK: tl.constexpr):
    """xa [BLOCK_M, BLOCK_R] float32 = sum over the split_k partials of columns col0 .. col0 + R,
    chunk by chunk in a fixed order (deterministic; SPLIT_CHUNK bounds the registers: a runtime
    loop, so the compiler does not hoist every chunk's loads at once)."""
    rs = tl.arange(0, BLOCK_R)
    ok = row_ok[None, :, None] & (rs < R)[None, None, :]
    ptrs = part_ptr + row_off[None, :, None] * stride_pm + (col0 + rs)[None, None, :]
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for s0 in range(0, split_k, SPLIT_CHUNK):
        ss = s0 + tl.arange(0, SPLIT_CHUNK)
        p = tl.load(ptrs + ss[:, None, None].to(tl.int64) * stride_ps,
                    mask=(ss < split_k)[:, None, None] & ok, other=0.0)  # [SPLIT_CHUNK, BLOCK_M, BLOCK_R]
        xa += tl.sum(p, axis=0)
    return xa


@triton.jit
def _expand_kernel(part_ptr, b_ptr, y_ptr, indptr_ptr, slots_ptr, starts_ptr, num_segs, R, split_k,
                   slot_cols, stride_ps, stride_pm, stride_bs, stride_bo, stride_ym,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                   N_BLOCKS: tl.constexpr, SPLIT_CHUNK: tl.constexpr,
                   BY_SLOT: tl.constexpr, BLOCK_B: tl.constexpr):
    """Program (m-block * N_BLOCKS + n-block, group, shard): y tile += xa tile @ B tile. xa's
    columns of shard k start at slot * slot_cols + k R (slot_cols 0: per-token partials of the
    shrink; n R: the fused GEMM's h, every slot's columns side by side)."""
    shard = tl.program_id(2)
    pid_n = tl.program_id(0) % N_BLOCKS
    slot, rows, row_ok, live = _group_rows(indptr_ptr, slots_ptr, num_segs, tl.program_id(0) // N_BLOCKS,
                                           BLOCK_M, BY_SLOT, BLOCK_B)
    col0 = tl.load(starts_ptr + shard)
    size = tl.load(starts_ptr + shard + 1) - col0
    if not live or pid_n * BLOCK_N >= size:
        return
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < size
    xa = _reduce_partials(part_ptr, rows, row_ok, slot * slot_cols + shard * R, R, split_k, stride_ps, stride_pm,
                          BLOCK_M, BLOCK_R, SPLIT_CHUNK)
    rs = tl.arange(0, BLOCK_R)
    b = tl.load(b_ptr + slot.to(tl.int64) * stride_bs + (col0 + cols)[None, :] * stride_bo + rs[:, None],
                mask=col_ok[None, :] & (rs < R)[:, None], other=0.0)      # [BLOCK_R, BLOCK_N]
    delta = tl.dot(xa.to(b_ptr.dtype.element_ty), b)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + (col0 + cols)[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _expand_decode_kernel(h_ptr, b_ptr, y_ptr, slots_ptr, starts_ptr, OUT, R, slot_cols,
                          stride_hm, stride_bs, stride_bo, stride_ym,
                          N_SHARDS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """Program (row t, column block), one token per segment so slot(t) = seg_slots[t]:
    y[t, c] += sum_r h[t, slot * slot_cols + shard(c) R + r] * B[slot, c, r]. A base-model row
    returns at once; B comes from L2 (every row of a slot reads the same [OUT, R] block)."""
    row = tl.program_id(0)
    slot = tl.load(slots_ptr + row)
    if slot < 0:
        return
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < OUT
    row64 = row.to(tl.int64)
    h_base = h_ptr + row64 * stride_hm + slot * slot_cols
    b_base = b_ptr + slot.to(tl.int64) * stride_bs + cols[:, None] * stride_bo
    delta = tl.zeros((BLOCK_N,), dtype=tl.float32)                           # float32 accumulate
    for r0 in range(0, R, BLOCK_R):          # one pass when R <= BLOCK_R (every rank up to 256)
        rs = r0 + tl.arange(0, BLOCK_R)
        r_ok = rs < R
        # each column's shard (starts[k] <= c < starts[k+1]) and that shard's values of h
        hsel = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        for k in tl.static_range(N_SHARDS):
            hk = tl.load(h_base + k * R + rs, mask=r_ok, other=0.0).to(tl.float32)
            in_k = (cols >= tl.load(starts_ptr + k)) & (cols < tl.load(starts_ptr + k + 1))
            hsel = tl.where(in_k[:, None], hk[None, :], hsel)
        b = tl.load(b_base + rs[None, :], mask=col_ok[:, None] & r_ok[None, :], other=0.0)   # [BLOCK_N, BLOCK_R]
        delta += tl.sum(hsel * b.to(tl.float32), axis=1)
    y_ptrs = y_ptr + row64 * stride_ym + cols
    y = tl.load(y_ptrs, mask=col_ok, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _expand_dense_kernel(h_ptr, b_ptr, y_ptr, slots_ptr, starts_ptr, T, OUT, R, slot_cols,
                         stride_hm, stride_bs, stride_bo, stride_ym,
                         N_SHARDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
    """Program (block of BLOCK_M rows, column block inside one shard k, slot s), one token per
    segment: for the block's rows of slot s (none: return at once)
        y[t, c] += sum_r h[t, s * slot_cols + k R + r] * B[s, c, r]
    as one [BLOCK_M, R] x [R, BLOCK_N] dot. A row has one slot, so every element of y is written
    by at most one program (no atomics; the sum order is fixed), and slot s's B block is read
    once per row block instead of once per row."""
    s = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_s = tl.load(slots_ptr + rows, mask=rows < T, other=-1) == s
    if tl.max(in_s.to(tl.int32), axis=0) == 0:
        return
    c0 = tl.program_id(1) * BLOCK_N
    cols = c0 + tl.arange(0, BLOCK_N)
    col_ok = cols < OUT
    shard = 0
    for k in tl.static_range(1, N_SHARDS):       # BLOCK_N divides every shard: one shard a block
        shard += (c0 >= tl.load(starts_ptr + k)).to(tl.int32)
    rs = tl.arange(0, BLOCK_R)
    r_ok = rs < R
    rows64 = rows.to(tl.int64)
    h = tl.load(h_ptr + rows64[:, None] * stride_hm + s * slot_cols + shard * R + rs[None, :],
                mask=in_s[:, None] & r_ok[None, :], other=0.0)
    b = tl.load(b_ptr + s * stride_bs + cols[:, None] * stride_bo + rs[None, :],
                mask=col_ok[:, None] & r_ok[None, :], other=0.0)                      # [BLOCK_N, BLOCK_R]
    if IEEE:
        delta = tl.dot(h, tl.trans(b), input_precision="ieee")
    else:
        delta = tl.dot(h, tl.trans(b))
    y_ptrs = y_ptr + rows64[:, None] * stride_ym + cols[None, :]
    mask = in_s[:, None] & col_ok[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=mask)


def _block(n: int, lo: int = 16, hi: int = 128) -> int:
    return min(hi, max(lo, triton.next_power_of_2(n)))


def _grouping(segments: int, num_slots: int, max_seg_len: int) -> tuple[int, int, bool, int]:
    """(groups, most rows of a group, BY_SLOT, BLOCK_B): decode batches (every segment at most one
    token) group their rows by adapter slot, so each slot's weights are read once per m-block
    instead of once per request; longer segments are their own groups. Host ints only."""
    if max_seg_len == 1 and segments <= MAX_SLOT_GROUPED:
        return num_slots, segments, True, _block(segments, lo=64, hi=MAX_SLOT_GROUPED)   # few variants
    return segments, max_seg_len, False, 1


def split_plan(k: int, tiles: int = 1, split_k: Optional[int] = None, sms: int = 132) -> tuple[int, int, int]:
    """(SPLIT_K, columns per split, BLOCK_K) for a shrink over K with about ``tiles`` live output
    tiles; every split non-empty (splitk.plan_split). Default: enough splits for PROGRAMS_PER_SM
    programs an SM, at least K_PER_SPLIT columns each (decode on Llama-3.1-8B: K 4096 -> 16,
    14336 -> 56); a long prefill already has the programs and gets 1 (partials that large would
    cost the expand more than they save)."""
    if split_k is None:
        split_k = min(MAX_SPLIT_K, triton.cdiv(k, K_PER_SPLIT), max(1, PROGRAMS_PER_SM * sms // tiles))
    block_k = _block(triton.cdiv(k, max(1, split_k)), hi=64)
    plan = plan_split(k, tiles, block_k, sms, split_k)
    return plan.split, plan.k_per_split, block_k


def lora_shrink(x: torch.Tensor, a: torch.Tensor, seg_indptr: torch.Tensor, seg_slots: torch.Tensor,
                max_seg_len: int, split_k: Optional[int] = None) -> torch.Tensor:
    """x [T, K], a [S, N, K] -> partial sums [SPLIT_K, T, N] float32 (``lora_expand`` reduces them;
    rows of base-model segments unwritten). ``split_k``: force a split (tests); default from the
    shapes (host ints only: graph-capturable)."""
    t, k = x.shape
    n = a.shape[1]
    segments = seg_slots.shape[0]
    groups, group_rows, by_slot, block_b = _grouping(segments, a.shape[0], max_seg_len)
    block_n = _block(n, hi=64)
    n_blocks = triton.cdiv(n, block_n)
    live_tiles = (triton.cdiv(t, BLOCK_M) + min(groups, t)) * n_blocks     # an upper bound
    splits, per_split, block_k = split_plan(k, max(1, live_tiles), split_k, sm_count(x.device))
    part = torch.empty(splits, t, n, dtype=torch.float32, device=x.device)
    if t == 0 or segments == 0 or max_seg_len == 0:
        return part
    x = x if x.stride(-1) == 1 else x.contiguous()
    grid = (triton.cdiv(group_rows, BLOCK_M) * n_blocks * splits, groups)
    _shrink_kernel[grid](x, a, part, seg_indptr, seg_slots, segments, n, k, per_split, splits,
                         x.stride(0), a.stride(0), a.stride(1), part.stride(0), part.stride(1),
                         BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k, N_BLOCKS=n_blocks,
                         BY_SLOT=by_slot, BLOCK_B=block_b)
    return part


@lru_cache(maxsize=64)
def _shard_starts(sizes: tuple[int, ...], device: str) -> torch.Tensor:
    """[n + 1] int32 first output column of each shard (and the total), one tensor per layout."""
    starts = [0]
    for s in sizes:
        starts.append(starts[-1] + s)
    return torch.tensor(starts, dtype=torch.int32, device=device)


def lora_expand(part: torch.Tensor, b: torch.Tensor, y: torch.Tensor, shard_sizes: list[int],
                seg_indptr: torch.Tensor, seg_slots: torch.Tensor, max_seg_len: int,
                slot_cols: int = 0) -> torch.Tensor:
    """y [T, OUT] += per shard k: xa[:, c0 + kR:c0 + (k+1)R] @ b[slot, shard k rows].T, c0 = slot *
    slot_cols; b [S, OUT, R]; xa = part.sum(0): part [SPLIT_K, T, n R] from ``lora_shrink`` (or a
    plain xa [T, n R]; or with slot_cols = n R the fused GEMM's h [T, S n R])."""
    segments = seg_slots.shape[0]
    if y.shape[0] == 0 or segments == 0 or max_seg_len == 0:
        return y
    part = part if part.dim() == 3 else part.unsqueeze(0)
    r = b.shape[2]
    starts = _shard_starts(tuple(shard_sizes), str(y.device))
    # 128-wide tiles: out = 6144 .. 28672 gives 48 .. 224 programs per row block, each
    # [BLOCK_R, 128] of B (4 KiB bf16 at R 16); 4 warps suit those small dot tiles
    block_n, block_r = _block(max(shard_sizes), hi=128), max(16, triton.next_power_of_2(r))   # all R at once
    n_blocks = triton.cdiv(max(shard_sizes), block_n)
    chunk = min(triton.next_power_of_2(part.shape[0]), max(1, REDUCE_ELEMS // (BLOCK_M * block_r)))
    groups, group_rows, by_slot, block_b = _grouping(segments, b.shape[0], max_seg_len)
    grid = (triton.cdiv(group_rows, BLOCK_M) * n_blocks, groups, len(shard_sizes))
    _expand_kernel[grid](part, b, y, seg_indptr, seg_slots, starts, segments, r, part.shape[0], slot_cols,
                         part.stride(0), part.stride(1), b.stride(0), b.stride(1), y.stride(0),
                         BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_R=block_r, N_BLOCKS=n_blocks,
                         SPLIT_CHUNK=chunk, BY_SLOT=by_slot, BLOCK_B=block_b)
    return y


def _dense_block_n(shard_sizes: list[int], r: int) -> int:
    """The dense decode expand's column block: a power of two <= 128 dividing every shard (so a
    block lies in one shard), narrower for wide ranks ([BLOCK_N, BLOCK_R] <= DENSE_TILE); 0 when
    none >= 16 fits (the per-row kernel then serves)."""
    block_r = max(16, triton.next_power_of_2(r))
    if block_r > 256:
        return 0
    block_n = min(128, max(16, DENSE_TILE // block_r))
    while block_n >= 16 and any(size % block_n for size in shard_sizes):
        block_n //= 2
    return block_n if block_n >= 16 else 0


def lora_expand_fused(h: torch.Tensor, b: torch.Tensor, y: torch.Tensor, shard_sizes: list[int],
                      seg_indptr: torch.Tensor, seg_slots: torch.Tensor, max_seg_len: int) -> torch.Tensor:
    """The expand of the fused-shrink path: h [T, S n R] = x @ A_all.T (every slot's A rows, from
    the base GEMM, model dtype) -> y [T, OUT] (row-strided view allowed) += per token its slot's
    columns of h @ B[slot].T, shard by shard. One launch. Decode (one token per segment: T ==
    segments, max_seg_len 1): a program per (row, column block), no slot scan; otherwise the
    segment expand reading h's slot columns (split-K 1)."""
    t, segments = y.shape[0], seg_slots.shape[0]
    if t == 0 or segments == 0 or max_seg_len == 0:
        return y
    r = b.shape[2]
    slot_cols = len(shard_sizes) * r
    if not (max_seg_len == 1 and segments == t):
        return lora_expand(h, b, y, shard_sizes, seg_indptr, seg_slots, max_seg_len, slot_cols=slot_cols)
    out = y.shape[1]
    starts = _shard_starts(tuple(shard_sizes), str(y.device))
    dense_n = _dense_block_n(shard_sizes, r)
    if t >= DENSE_MIN_ROWS and dense_n:
        block_m = min(64, triton.next_power_of_2(t))
        _expand_dense_kernel[(triton.cdiv(t, block_m), triton.cdiv(out, dense_n), b.shape[0])](
            h, b, y, seg_slots, starts, t, out, r, slot_cols, h.stride(0), b.stride(0), b.stride(1),
            y.stride(0), N_SHARDS=len(shard_sizes), BLOCK_M=block_m, BLOCK_N=dense_n,
            BLOCK_R=max(16, triton.next_power_of_2(r)), IEEE=h.dtype == torch.float32, num_warps=4)
        return y
    block_r = _block(r, hi=256)
    block_n = min(triton.next_power_of_2(out), max(32, min(512, DECODE_TILE // block_r)))
    _expand_decode_kernel[(t, triton.cdiv(out, block_n))](
        h, b, y, seg_slots, starts, out, r, slot_cols, h.stride(0), b.stride(0), b.stride(1), y.stride(0),
        N_SHARDS=len(shard_sizes), BLOCK_N=block_n, BLOCK_R=block_r, num_warps=4)
    return y
