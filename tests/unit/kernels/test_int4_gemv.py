"""The int4 GEMV (kvyard.kernels.triton_ops.int4_gemm, N-major kernel layout) equals the float32
reference x @ ((q - z) * s)^T, in the Triton CPU interpreter: every autotune config of every M
bucket (the H100 may pick any), M = 1..16, group 32/64/128, symmetric and asymmetric zeros,
GPTQ act-order g_idx, K splits (summed in the same launch: the bits of the two-launch sum),
bfloat16 activations; and the layer stores the kernel layout.

Tolerance: float32 rtol/atol 1e-5 at M <= 4 (CUDA-core path: the dequantized weight is exact in
float32, only the summation order differs; at M <= 2 the zero point folded per word adds
float32 rounding of ~1e-7 s sum|x|, well inside at these scales: test_int4_fold.py bounds it)
and in the dot path for float32 x (ieee);
bfloat16 x: one bfloat16 unit (the result is rounded to bfloat16; the dot path rounds the weight
to tf32).
"""
import os

os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported anywhere in this process

import pytest
import torch

from kvyard.layers import quant_math as qm
from kvyard.layers.quantized_linear import int4_kernel_layout

pytest.importorskip("triton")

from kvyard.kernels.triton_ops import int4_gemm as i4   # noqa: E402
from kvyard.kernels.triton_ops import splitk            # noqa: E402

F32 = dict(rtol=1e-5, atol=1e-5)
BF16 = dict(rtol=1.6e-2, atol=2e-2)


def _weights(n, k, group, act_order=False, symmetric=False, dtype=torch.float32, seed=0):
    """Canonical (qweight [K/8, N], scales [G, N], zeros [G, N], g_idx [K])."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, n), dtype=torch.int32, generator=gen)
    groups = k // group
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.001).to(dtype)
    zeros = (torch.full((groups, n), 8) if symmetric
             else torch.randint(0, 16, (groups, n), generator=gen)).to(torch.uint8)
    g_idx = torch.arange(k, dtype=torch.int32) // group
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    return qm.pack_int4_rows(q), scales, zeros, g_idx


def _run(x, canon, group_size, **kw):
    qweight, scales, zeros, g_idx = canon
    expected = x.float() @ qm.dequantize_int4(qweight, scales, zeros, g_idx, torch.float32).t()
    got = i4.int4_gemm(x, *int4_kernel_layout(qweight, scales, zeros), g_idx, group_size, **kw)
    assert got.dtype == x.dtype and got.shape == expected.shape
    return got.float(), expected


BUCKET_ROWS = {1: 1, 2: 2, 4: 3, 16: 11, 64: 70}
# the DOT16 configs (16-bit x, sequential groups only) have their own tests: test_int4_dot16.py
# (and so do the pipelined WPT ones, 16-bit x only: test_int4_fold.py)
CASES = [(b, j) for b in i4.GEMV_CONFIGS for j, c in enumerate(i4.GEMV_CONFIGS[b])
         if not (c.kwargs["DOT16"] or c.kwargs["PIPE"])]


@pytest.mark.parametrize("bucket,index", CASES)
def test_every_config_equals_float32_reference(bucket, index):
    """K 512 in one split (a tile may be shorter than BLOCK_K: masked), asymmetric group 64 read
    by row, and the same weights through g_idx (the gather path)."""
    cfg = i4.GEMV_CONFIGS[bucket][index]
    m = BUCKET_ROWS[bucket]
    wide = cfg.kwargs["WPT"] > 1        # a tile inside one group: its own group, no gather
    group = max(64, cfg.kwargs["BLOCK_K"]) if wide else 64
    canon = _weights(96 if cfg.kwargs["BLOCK_N"] < 64 else 128, 512, group, seed=index)
    x = torch.randn(m, 512, generator=torch.Generator().manual_seed(bucket))
    for group_size in (group,) if wide else (group, 0):
        torch.testing.assert_close(*_run(x, canon, group_size, split=1, config=cfg), **F32)


@pytest.mark.parametrize("m,k,n,group,act_order,symmetric,split", [
    (1, 256, 64, 32, False, True, None), (1, 512, 192, 128, False, False, 2),
    (1, 384, 80, 128, True, False, 3), (2, 256, 72, 32, False, False, 2),
    (4, 512, 64, 128, True, True, None), (6, 384, 160, 64, False, False, 3),
    (9, 512, 64, 32, True, False, 4), (16, 256, 192, 128, False, True, 2),
    (1, 256, 70, 64, False, False, 2), (3, 256, 70, 32, True, False, None), (12, 256, 70, 64, False, False, 1)])
def test_shapes_groups_and_splits(m, k, n, group, act_order, symmetric, split):
    """Default configs (the interpreter does not tune), N not a multiple of BLOCK_N (70: not even
    of the 4 interleaved outputs: padded), K split in 128-wide pieces (the configs that tile
    them), K not a multiple of BLOCK_K."""
    canon = _weights(n, k, group, act_order, symmetric, seed=m + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(n))
    for group_size in (0,) if act_order else (group, 0):
        torch.testing.assert_close(*_run(x, canon, group_size, split=split), **F32)


@pytest.mark.parametrize("m", [1, 3, 16])
def test_bfloat16_activations(m):
    canon = _weights(128, 256, 64, dtype=torch.bfloat16, seed=m)
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m)).bfloat16()
    torch.testing.assert_close(*_run(x, canon, 64, split=2), **BF16)


@pytest.fixture
def reduce_launches(monkeypatch):
    """How many times int4_gemm called the two-launch splitk_reduce."""
    calls = []
    monkeypatch.setattr(i4, "splitk_reduce", lambda *a, **kw: calls.append(1) or splitk.splitk_reduce(*a, **kw))
    return calls


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("m", [1, 2, 4, 16])
def test_split_k_sums_in_the_same_launch_bit_identical(m, act_order, reduce_launches):
    """K split 4 ways: the last split program of each output tile sums the partials in the same
    launch, with the bits of the two-launch sum (float32 and bfloat16 output), and leaves every
    tile counter at 0. The interpreter runs a launch's programs one after another: this tests
    the counting and summing logic, not the GPU memory ordering (tests/gpu/test_gpu_int4.py
    replays the one-launch GEMV from a CUDA graph)."""
    canon = _weights(96, 512, 64, act_order, seed=m)
    packed = int4_kernel_layout(*canon[:3])
    group_size = 0 if act_order else 64
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(m, 512, generator=torch.Generator().manual_seed(m)).to(dtype)
        one = i4.int4_gemm(x, *packed, canon[3], group_size, split=4)
        assert reduce_launches == []
        two = i4.int4_gemm(x, *packed, canon[3], group_size, split=4, fuse_reduce=False)
        assert reduce_launches == [1]
        reduce_launches.clear()
        assert one.dtype == dtype and torch.equal(one, two)
        assert not splitk.tile_counters(x.device).any()


def test_tiled_kernel_reads_the_same_layout():
    canon = _weights(80, 256, 32, act_order=True, seed=5)
    x = torch.randn(20, 256, generator=torch.Generator().manual_seed(5))
    qweight, scales, zeros, g_idx = canon
    expected = x @ qm.dequantize_int4(qweight, scales, zeros, g_idx, torch.float32).t()
    got = i4.int4_gemm_tiled(x, *int4_kernel_layout(qweight, scales, zeros), g_idx)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("m,group_size", [(17, 64), (130, 0)])
def test_prefill_sizes_take_64_row_blocks(m, group_size):
    """M > 16: the dot path over several 64-row blocks (the last one partial)."""
    canon = _weights(72, 256, 64, act_order=group_size == 0, seed=m)
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m))
    torch.testing.assert_close(*_run(x, canon, group_size), **F32)


@pytest.mark.parametrize("n", [64, 70])
def test_kernel_layout_round_trip(n):
    from kvyard.layers.quantized_linear import int4_canonical_qweight

    qweight = _weights(n, 128, 32)[0]
    packed = int4_kernel_layout(qweight, torch.zeros(4, n), torch.zeros(4, n))[0]
    assert packed.shape == (-(-n // 4), 16, 4)
    assert torch.equal(packed[1, 3], qweight[3, 4:8])             # outputs 4..7, word 3
    assert torch.equal(int4_canonical_qweight(packed, n), qweight)


def test_configs_fit_buckets_and_splits():
    assert [i4.m_bucket(m) for m in (1, 2, 3, 4, 5, 16, 17, 4096)] == [1, 2, 4, 4, 16, 16, 64, 64]
    for bucket, configs in i4.GEMV_CONFIGS.items():
        # every bucket keeps a config for any split of 128-multiples, and for one whole-K split
        assert any(i4.config_fits(c, bucket, 4096, 384) for c in configs)
        assert all(i4.config_fits(c, bucket, 4096, 4096) for c in configs)
        other = 1 if bucket != 1 else 2
        assert not any(i4.config_fits(c, other, 4096, 4096) for c in configs)   # by identity
        # the dot buckets' tiles are at least 16 wide (tl.dot)
        assert bucket < 16 or all(c.kwargs["BLOCK_N"] >= 16 for c in configs)


def test_a_config_that_does_not_tile_the_split_is_refused():
    canon = _weights(64, 512, 64)
    big_k = next(c for c in i4.GEMV_CONFIGS[1] if c.kwargs["BLOCK_K"] > 128)
    with pytest.raises(ValueError, match="does not serve"):
        _run(torch.randn(1, 512), canon, 64, split=4, config=big_k)   # 128-wide splits


def test_layer_stores_the_kernel_layout():
    from kvyard.layers import quantized_linear as ql
    from kvyard.layers.linear import Linear

    layer = Linear(256, [64, 32], method=ql.OnlineInt4LinearMethod(torch.float32, "cpu", 64))
    w = [torch.randn(64, 256), torch.randn(32, 256)]
    for shard, ws in enumerate(w):
        layer.load_shard(shard, ws)
    layer.process_after_loading()
    assert layer.qweight.shape == (24, 32, 4) and layer.qweight.is_contiguous()
    assert layer.scales.shape == layer.zeros.shape == (4, 96)
    dense = layer.method.dequantize(layer)
    assert dense.shape == (96, 256)
    # round-to-nearest int4: within half a step of each weight
    step = layer.scales.float().t().repeat_interleave(64, dim=1)
    assert bool(((dense - torch.cat(w)).abs() <= step / 2 + 1e-6).all())


def test_default_split_keeps_long_k_runs():
    """The default split at one row on 132 SMs (Llama-3.1-8B shapes): qkv, o and gate_up run
    unsplit, down (K 14336) in 4 splits; no split shorter than MIN_K_PER_SPLIT inputs."""
    from kvyard.kernels.triton_ops import int4_gemm as i4
    caps = {(k, n): i4._split_cap(k, n, 132) for k, n in [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]}
    assert caps == {(4096, 6144): 1, (4096, 4096): 1, (4096, 28672): 1, (14336, 4096): 4}
    assert all(k // cap >= i4.MIN_K_PER_SPLIT for (k, _), cap in caps.items())
