"""The LoRA shrink/expand Triton kernels under the CPU interpreter (TRITON_INTERPRET=1) against the
torch path: fused (qkv-shaped) and plain layers, prefill segments of mixed lengths and decode
rows (grouped by adapter slot in-kernel), base-model segments untouched, ranks padded below the
slot width; the split-K shrink (K in uneven chunks, partial sums reduced by the expand) for ranks
8/16/64, deterministic; the fused form's expand (h from one GEMM over every slot's A rows) into a
row-strided y, decode rows and segments."""
import os

os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported anywhere in this process

import pytest
import torch

pytest.importorskip("triton")

from kvyard.kernels.triton_ops.lora import lora_expand, lora_shrink, split_plan
from kvyard.lora.batch import build_batch_info
from kvyard.lora.ops import lora_torch, lora_triton


def _random_case(shard_sizes, in_features, rank, seg_lens, num_slots=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n, tokens = len(shard_sizes), sum(seg_lens)
    x = torch.randn(tokens, in_features, generator=gen)
    a = torch.randn(num_slots, n * rank, in_features, generator=gen)
    b = torch.randn(num_slots, sum(shard_sizes), rank, generator=gen)
    y0 = torch.randn(tokens, sum(shard_sizes), generator=gen)
    return x, a, b, y0


@pytest.mark.parametrize("shard_sizes,in_features,rank,seg_lens,slots", [
    ([32, 16, 16], 24, 8, [5, 1, 19, 3], [1, -1, 0, 1]),    # qkv-shaped, prefill with a base request
    ([40], 20, 4, [1, 1, 1, 1, 1], [2, 0, -1, 2, 1]),       # decode rows
    ([24, 24], 16, 16, [33], [0]),                            # gate_up-shaped, one long segment
])
def test_triton_matches_torch(shard_sizes, in_features, rank, seg_lens, slots):
    gen = torch.Generator().manual_seed(sum(seg_lens))
    num_slots, n = 3, len(shard_sizes)
    tokens = sum(seg_lens)
    x = torch.randn(tokens, in_features, generator=gen)
    a = torch.randn(num_slots, n * rank, in_features, generator=gen)
    b = torch.randn(num_slots, sum(shard_sizes), rank, generator=gen)
    a[:, :, :][:, rank // 2:rank] = 0     # a smaller adapter rank in shard 0: zero-padded rows
    y0 = torch.randn(tokens, sum(shard_sizes), generator=gen)
    info = build_batch_info(slots, seg_lens, "cpu")
    want = lora_torch(x, y0.clone(), a, b, shard_sizes, info)
    got = lora_triton(x, y0.clone(), a, b, shard_sizes, info)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    base_rows = [t for i, s in enumerate(slots) if s < 0 for t in range(sum(seg_lens[:i]), sum(seg_lens[:i + 1]))]
    assert torch.equal(got[base_rows], y0[base_rows])
    assert not torch.allclose(want, y0)


def test_graph_batch_slots_are_read_from_the_buffers():
    """The decode graph's LoRABatchInfo (no host groups): refilling the slot buffer changes the result."""
    from kvyard.lora.batch import LoRABatchInfo

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, generator=gen)
    a, b = torch.randn(2, 4, 8, generator=gen), torch.randn(2, 12, 4, generator=gen)
    slots = torch.tensor([0, 1, -1, 0], dtype=torch.int32)
    info = LoRABatchInfo(seg_indptr=torch.arange(5, dtype=torch.int32), seg_slots=slots, max_seg_len=1)
    first = lora_triton(x, torch.zeros(4, 12), a, b, [12], info)
    torch.testing.assert_close(first, lora_torch(x, torch.zeros(4, 12), a, b, [12], info))
    slots.copy_(torch.tensor([1, 1, 0, -1], dtype=torch.int32))
    second = lora_triton(x, torch.zeros(4, 12), a, b, [12], info)
    torch.testing.assert_close(second, lora_torch(x, torch.zeros(4, 12), a, b, [12], info))
    assert not torch.allclose(first, second)


@pytest.mark.parametrize("shard_sizes,in_features,rank,seg_lens,slots,split_k", [
    ([32, 16, 16], 40, 8, [5, 1, 19, 3], [1, -1, 0, 2], 3),      # K 40 in 16 + 16 + 8, qkv-shaped
    ([48], 100, 16, [1] * 6, [2, 0, -1, 2, 1, 0], 4),            # decode rows, K 100 in 4 x 32 (last 4)
    ([24, 40], 260, 64, [2, 17], [0, 1], 17),                     # rank 64: the reduction in 4 chunks
    ([16, 16], 72, 8, [1] * 40, [0, 1, 0, -1, 0] * 8, 3),         # decode: slot 0 has 24 rows (2 m-blocks)
    ([24], 50, 16, [1, 0, 1, 1, 0], [1, 1, -1, 1, 0], 2),         # decode with empty segments
])
def test_split_k_matches_torch(shard_sizes, in_features, rank, seg_lens, slots, split_k):
    x, a, b, y0 = _random_case(shard_sizes, in_features, rank, seg_lens, seed=split_k)
    info = build_batch_info(slots, seg_lens, "cpu")
    part = lora_shrink(x, a, info.seg_indptr, info.seg_slots, info.max_seg_len, split_k=split_k)
    assert part.shape[0] == split_k and part.dtype == torch.float32
    got = lora_expand(part, b, y0.clone(), shard_sizes, info.seg_indptr, info.seg_slots, info.max_seg_len)
    want = lora_torch(x, y0.clone(), a, b, shard_sizes, info)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    again = lora_expand(lora_shrink(x, a, info.seg_indptr, info.seg_slots, info.max_seg_len, split_k=split_k),
                        b, y0.clone(), shard_sizes, info.seg_indptr, info.seg_slots, info.max_seg_len)
    assert torch.equal(got, again)      # fixed reduction order: bitwise the same every run


def test_default_split_plan():
    """Few tiles (decode): Llama-3.1-8B widths split into 256-column chunks; many tiles (a long
    prefill): fewer splits, down to none; a K of a few hundred already splits (and runs through
    lora_triton's defaults)."""
    assert split_plan(4096) == (16, 256, 64)
    assert split_plan(14336, tiles=8) == (56, 256, 64)
    assert split_plan(4096, tiles=128)[0] == 4
    assert split_plan(4096, tiles=513)[0] == 1
    assert split_plan(64) == (1, 64, 64)
    splits, per_split, _ = split_plan(600)
    assert splits == 3 and per_split * (splits - 1) < 600 <= per_split * splits
    x, a, b, y0 = _random_case([16, 8, 8], 600, 8, [3, 1], seed=1)
    info = build_batch_info([1, 0], [3, 1], "cpu")
    torch.testing.assert_close(lora_triton(x, y0.clone(), a, b, [16, 8, 8], info),
                               lora_torch(x, y0.clone(), a, b, [16, 8, 8], info), rtol=1e-4, atol=1e-3)


_COMPILE_SM90 = """
import sys
import pytest, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kvyard.kernels.triton_ops import lora as kernels

def build(fn, pointers, ints, consts):
    sig = {**pointers, **{name: "i32" for name in ints}, **{name: "constexpr" for name in consts}}
    names = list(sig)
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    try:
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    except RuntimeError as exc:
        if str(exc).startswith("Cannot find") and "ptxas" in str(exc):
            sys.exit(3)                    # no CUDA toolchain in this Triton install
        raise

by_slot = sys.argv[1] == "1"
rows = dict(BY_SLOT=by_slot, BLOCK_B=kernels.MAX_SLOT_GROUPED if by_slot else 1)
build(kernels._shrink_kernel, dict(x_ptr="*bf16", a_ptr="*bf16", part_ptr="*fp32", indptr_ptr="*i32", slots_ptr="*i32"),
      ["num_segs", "N", "K", "k_per_split", "split_k", "stride_xm", "stride_as", "stride_an", "stride_ps", "stride_pm"],
      dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, N_BLOCKS=3, **rows))
build(kernels._expand_kernel, dict(part_ptr="*fp32", b_ptr="*bf16", y_ptr="*bf16", indptr_ptr="*i32",
                                   slots_ptr="*i32", starts_ptr="*i32"),
      ["num_segs", "R", "split_k", "slot_cols", "stride_ps", "stride_pm", "stride_bs", "stride_bo", "stride_ym"],
      dict(BLOCK_M=16, BLOCK_N=128, BLOCK_R=64, N_BLOCKS=112, SPLIT_CHUNK=kernels.REDUCE_ELEMS // (16 * 64), **rows))
if by_slot:    # the fused form's decode expand: R 16 (256 columns a program) and R 64
    for block_n, block_r in ((256, 16), (64, 64)):
        build(kernels._expand_decode_kernel, dict(h_ptr="*bf16", b_ptr="*bf16", y_ptr="*bf16", slots_ptr="*i32",
                                                  starts_ptr="*i32"),
              ["OUT", "R", "slot_cols", "stride_hm", "stride_bs", "stride_bo", "stride_ym"],
              dict(N_SHARDS=3, BLOCK_N=block_n, BLOCK_R=block_r))
    # the dense decode expand (16+ rows): R 16 at 128 columns, R 64 at 64 columns
    for block_m, block_n, block_r in ((64, 128, 16), (16, 64, 64)):
        build(kernels._expand_dense_kernel, dict(h_ptr="*bf16", b_ptr="*bf16", y_ptr="*bf16", slots_ptr="*i32",
                                                 starts_ptr="*i32"),
              ["T", "OUT", "R", "slot_cols", "stride_hm", "stride_bs", "stride_bo", "stride_ym"],
              dict(N_SHARDS=3, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, IEEE=False))
"""


@pytest.mark.parametrize("by_slot", [True, False])
def test_kernels_compile_for_sm90(by_slot):
    """The interpreter runs the kernels as Python; this compiles them to an H100 cubin (Triton's
    bundled ptxas, no GPU needed; a process without TRITON_INTERPRET): rank 64, the largest
    reduction tile, at the widest decode slot scan; the fused form's decode expands."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SM90, "1" if by_slot else "0"], env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode == 3:
        pytest.skip("no ptxas in this Triton install")
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("shard_sizes,in_features,rank,seg_lens,slots", [
    ([40], 20, 4, [1] * 6, [2, 0, -1, 2, 1, -1]),               # decode, n = 1, base rows between
    ([24, 40], 36, 16, [1] * 5, [0, 1, 1, -1, 2]),              # decode, gate_up-shaped (n = 2)
    ([32, 16, 16], 24, 8, [1] * 7, [1, -1, 0, 1, 2, 2, 0]),     # decode, qkv-shaped (n = 3)
    ([600], 16, 8, [1, 1, 1], [0, 2, 1]),                       # decode, several column blocks
    ([32, 16, 16], 24, 8, [5, 1, 19, 3], [1, -1, 0, 2]),        # prefill segments: the segment expand
    ([24], 50, 16, [1, 0, 1, 1, 0], [1, 1, -1, 1, 0]),          # empty segments: rows != segments
    ([24, 8], 12, 300, [1] * 3, [2, -1, 0]),                    # rank 300: the decode R loop, 2 passes
    ([24, 8], 12, 200, [2, 3], [0, 2]),                         # rank 200 > 128 in the segment expand
    ([32, 16, 16], 24, 8, [1] * 37, [i % 4 - 1 for i in range(37)]),   # 37 decode rows: the dense expand
    ([64, 64], 20, 16, [1] * 16, [1, 1, 0, -1] * 4),            # dense, 16 rows, slot 2 unused (skipped)
    ([32], 20, 8, [1] * 70, [i % 5 - 2 for i in range(70)]),    # dense, 70 rows: two row blocks
    ([48, 16], 20, 24, [1] * 20, [2] * 20),                     # dense, one slot, rank 24 padded to 32
    ([24, 40], 36, 16, [1] * 18, [i % 3 for i in range(18)]),   # 18 rows, shards not 16-divisible: per row
])
def test_fused_expand_matches_torch(shard_sizes, in_features, rank, seg_lens, slots):
    """The fused form: h = x @ A_all.T from one GEMM (every slot's A rows after the base rows),
    the expand reading each row's slot columns into a row-strided y; equal to shrink + expand."""
    from kvyard.kernels.triton_ops.lora import lora_expand_fused
    from kvyard.lora.ops import expand_torch

    x, a, b, y0 = _random_case(shard_sizes, in_features, rank, seg_lens, seed=len(seg_lens))
    a[1, :rank // 2] = 0                       # slot 1 holds a smaller rank in shard 0
    out = sum(shard_sizes)
    info = build_batch_info(slots, seg_lens, "cpu")
    want = lora_torch(x, y0.clone(), a, b, shard_sizes, info)
    for expand in (expand_torch, lambda h, y, b, s, i: lora_expand_fused(h, b, y, s, i.seg_indptr, i.seg_slots,
                                                                        i.max_seg_len)):
        y_ext = torch.cat([y0, x @ a.reshape(-1, in_features).t()], dim=1)   # [T, out + S n R]
        got = expand(y_ext[:, out:], y_ext[:, :out], b, shard_sizes, info)
        assert got.data_ptr() == y_ext.data_ptr() and got.stride(0) == y_ext.shape[1]   # in place
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        base_rows = [t for i, s in enumerate(slots) if s < 0 for t in range(sum(seg_lens[:i]), sum(seg_lens[:i + 1]))]
        assert torch.equal(got[base_rows], y0[base_rows])
