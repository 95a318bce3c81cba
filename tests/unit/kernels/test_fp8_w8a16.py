"""The fp8 kernels in the Triton CPU interpreter: the weight-only decode GEMV
(kvyard.kernels.triton_ops.fp8_gemv) equals the float32 reference x.float() @ (w.float() * sw).T
for M = 1..16, per-channel, per-tensor and block scales, K not a multiple of BLOCK_K, split-K
(summed in the same launch: the bits of the two-launch sum), and every autotune config; the one-launch activation quantization
(kvyard.kernels.triton_ops.fp8_quant) is bit-identical to quant_math; the fp8 layers route
M <= 16 to the GEMV and larger batches through the quantization kernel. (The fp8 KV-cache write:
test_triton_ops.py; the triton attention kernels reading an fp8 pool:
tests/unit/mem_cache/test_fp8_kv_cache.py.)

Tolerance: float32 rtol/atol 1e-5 (an e4m3 value times a float32 / bf16 value is exact in
float32; only the order of the float32 sums differs); bfloat16 output: one unit in the last place.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported anywhere in this process

import pytest
import torch

from kvyard.layers import quant_math as qm

pytest.importorskip("triton")

import triton                                                    # noqa: E402
import triton.language as tl                                     # noqa: E402

from kvyard.kernels.triton_ops import fp8_gemv as fg             # noqa: E402
from kvyard.kernels.triton_ops import fp8_quant as fq            # noqa: E402
from kvyard.kernels.triton_ops import splitk                     # noqa: E402

F32 = dict(rtol=1e-5, atol=1e-5)
BF16 = dict(rtol=1.6e-2, atol=2e-2)


def _weight(n, k, scheme, block=128):
    """(w [N, K] e4m3, sw as the layer stores it, the float32 dense weight)."""
    w = torch.randn(n, k) * 0.05
    if scheme == "channel":
        wq, sw = qm.fp8_per_row(w)
        sw = sw.view(n)
    elif scheme == "tensor":
        wq, s = qm.fp8_per_tensor(w)
        sw = s.reshape(1).expand(n).contiguous()
    else:
        kb = -(-k // block)
        wq = (w * 20).to(torch.float8_e4m3fn)
        sw = qm.expand_block_scales(torch.rand(-(-n // block), kb) * 0.01 + 1e-3, n, k, (block, block))
        return wq, sw, qm.dequantize_block(wq, sw, block)
    return wq, sw, wq.float() * sw[:, None]


def _first_config(m, scale_k=0):
    return next(c for c in fg.CONFIGS if fg.config_fits(c, 1 if m == 1 else fg.MAX_M, scale_k))


@pytest.mark.parametrize("m,k,n,scheme", [
    (1, 300, 64, "channel"), (2, 520, 48, "tensor"), (5, 300, 96, "channel"), (16, 640, 40, "channel"),
    (1, 384, 72, "block"), (9, 300, 136, "block"), (3, 1100, 40, "tensor"), (1, 2100, 24, "channel")])
def test_w8a16_equals_float32_reference(m, k, n, scheme):
    """K = 300, 520, 640, 1100, 2100: not multiples of BLOCK_K; the last two split K."""
    torch.manual_seed(m * k + n)
    x = torch.randn(m, k)
    wq, sw, dense = _weight(n, k, scheme)
    got = fg.fp8_w8a16_gemv(x, wq, sw, 128 if scheme == "block" else 0)
    assert got.shape == (m, n) and got.dtype == torch.float32
    torch.testing.assert_close(got, x @ dense.t(), **F32)


@pytest.mark.parametrize("m", [1, 7])
def test_every_autotune_config_computes_the_same(m):
    torch.manual_seed(m)
    k, n = 520, 72
    x = torch.randn(m, k)
    wq, sw, dense = _weight(n, k, "channel")
    fits = [c for c in fg.CONFIGS if fg.config_fits(c, 1 if m == 1 else fg.MAX_M, 0)]
    assert len(fits) >= 4
    for cfg in fits:
        torch.testing.assert_close(fg.fp8_w8a16_gemv(x, wq, sw, config=cfg), x @ dense.t(), **F32)


@pytest.fixture
def reduce_launches(monkeypatch):
    """How many times fp8_w8a16_gemv called the two-launch splitk_reduce."""
    calls = []
    monkeypatch.setattr(fg, "splitk_reduce", lambda *a, **kw: calls.append(1) or splitk.splitk_reduce(*a, **kw))
    return calls


@pytest.mark.parametrize("m", [1, 16])
def test_split_k_sums_in_the_same_launch_bit_identical(m, reduce_launches):
    """N 40, K 2100: K split 5 ways (per-channel and block scales, float32 and bfloat16 output);
    the last split program of each row block sums the partials in the same launch, with the
    bits of the two-launch sum, and leaves every tile counter at 0. The interpreter runs a
    launch's programs one after another: this tests the counting and summing logic, not the GPU
    memory ordering (tests/gpu/test_gpu_fp8.py replays the GEMV from a CUDA graph)."""
    torch.manual_seed(m)
    assert fg.plan_split(40, 2100)[0] == 5
    for scheme, dtype in (("channel", torch.float32), ("block", torch.bfloat16)):
        x = torch.randn(m, 2100).to(dtype)
        wq, sw, _ = _weight(40, 2100, scheme)
        scale_k = 128 if scheme == "block" else 0
        one = fg.fp8_w8a16_gemv(x, wq, sw, scale_k)
        assert reduce_launches == []
        two = fg.fp8_w8a16_gemv(x, wq, sw, scale_k, fuse_reduce=False)
        assert reduce_launches == [1]
        reduce_launches.clear()
        assert one.dtype == dtype and torch.equal(one, two)
        assert not splitk.tile_counters(x.device).any()


def test_split_k_takes_two_launches_where_the_counters_do_not_fit(monkeypatch, reduce_launches):
    torch.manual_seed(9)
    monkeypatch.setattr(splitk, "COUNTER_SLOTS", 4)      # 40 rows in 4-row blocks: 10 tiles
    x = torch.randn(1, 2100)
    wq, sw, dense = _weight(40, 2100, "channel")
    torch.testing.assert_close(fg.fp8_w8a16_gemv(x, wq, sw), x @ dense.t(), **F32)
    assert reduce_launches == [1]


def test_block_scales_with_narrow_blocks():
    """Block width 32: only K tiles of <= 32 fit, so a scale never changes inside a tile."""
    torch.manual_seed(3)
    x = torch.randn(4, 200)
    wq, sw, dense = _weight(40, 200, "block", block=32)
    cfg = triton.Config({"BLOCK_N": 16, "BLOCK_K": 32}, num_warps=4)
    assert fg.config_fits(cfg, fg.MAX_M, 32) and not fg.config_fits(_first_config(4), fg.MAX_M, 32)
    torch.testing.assert_close(fg.fp8_w8a16_gemv(x, wq, sw, 32, config=cfg), x @ dense.t(), **F32)


def test_w8a16_bfloat16_activations():
    torch.manual_seed(2)
    for m in (1, 4):
        x = torch.randn(m, 256).bfloat16()
        wq, sw, dense = _weight(96, 256, "channel")
        got = fg.fp8_w8a16_gemv(x, wq, sw)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), (x.float() @ dense.t()).bfloat16().float(), **BF16)


def test_w8a16_rejects_bad_shapes_and_takes_zero_rows():
    wq, sw, _ = _weight(64, 256, "channel")
    assert fg.fp8_w8a16_gemv(torch.empty(0, 256), wq, sw).shape == (0, 64)
    with pytest.raises(ValueError, match="M <= 16"):
        fg.fp8_w8a16_gemv(torch.randn(17, 256), wq, sw)
    with pytest.raises(ValueError, match="scale_k"):
        fg.fp8_w8a16_gemv(torch.randn(1, 256), wq, sw.repeat_interleave(4).view(64, 4), 96)


@pytest.mark.parametrize("n,k", [(4096, 4096), (1024, 4096), (40, 2100), (64, 300), (8, 16384)])
def test_split_plan_covers_k(n, k):
    split, per = fg.plan_split(n, k)
    assert per % fg.SPLIT_K_STEP == 0 and 1 <= split <= fg.MAX_SPLIT
    assert (split - 1) * per < k <= split * per
    assert split == 1 or n < fg.SPLIT_BELOW_N


# -- activation quantization -------------------------------------------------------------------
@triton.jit
def _round_kernel(v_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, fq.round_to_e4m3(tl.load(v_ptr + offs)))


def test_e4m3_rounding_equals_torch_cast():
    """Every e4m3 value, every midpoint between neighbours (ties to even), random values and
    tiny negatives (-0)."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[grid.isfinite()].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    v = torch.cat([grid, mids, torch.randn(4000) * 60, torch.randn(1000) * 1e-3]).clamp(-448, 448)
    v = torch.nn.functional.pad(v, (0, triton.next_power_of_2(v.numel()) - v.numel()))
    out = torch.empty_like(v)
    _round_kernel[(1,)](v, out, N=v.numel())
    assert torch.equal(out.view(torch.int32), v.to(torch.float8_e4m3fn).float().view(torch.int32))


def _bits(q):
    return q.view(torch.uint8)


def _cuda_per_row(x):
    """quant_math.fp8_per_row as torch computes it on CUDA, where the kernel runs: there
    ``amax / 448.0`` (a Python number) is amax times the float32 reciprocal, not a true division
    as on the CPU (tests/gpu/test_gpu_fp8.py compares against fp8_per_row itself on the GPU)."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax * (1.0 / 448.0)
    return qm.fp8_quantize(x, scale), scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_per_token_quantization_is_bit_identical(dtype):
    torch.manual_seed(1)
    x = (torch.randn(6, 1300) * 3).to(dtype)
    x[0, :50] *= 1e-4            # e4m3 subnormals and -0 after scaling
    x[2] = 0                     # the 1e-12 floor
    x[3, 7] = 1e4                # one outlier: the rest of the row underflows
    q, s = fq.per_token_fp8(x[:, :1290])          # a strided view: rows of 1290 with stride 1300
    q_ref, s_ref = _cuda_per_row(x[:, :1290])
    assert q.dtype == torch.float8_e4m3fn and s.shape == (6, 1)
    assert torch.equal(s, s_ref) and torch.equal(_bits(q), _bits(q_ref))


def test_static_quantization_is_bit_identical():
    torch.manual_seed(4)
    x = torch.randn(5, 700).bfloat16()
    scale = torch.tensor(0.004)                   # saturates the largest values: the clamp matters
    assert torch.equal(_bits(fq.static_fp8(x, scale)), _bits(qm.fp8_quantize(x, scale)))
    assert fq.static_fp8(torch.empty(0, 700), scale).shape == (0, 700)


# -- routing in the fp8 layers -----------------------------------------------------------------
@pytest.fixture
def kernel_calls(monkeypatch):
    """The row counts the GEMV and the quantization kernel are called with."""
    calls = {"gemv": [], "quant": []}
    for mod, name, key in ((fg, "fp8_w8a16_gemv", "gemv"), (fq, "per_token_fp8", "quant"),
                           (fq, "static_fp8", "quant")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, real=real, key=key, **kw: calls[key].append(a[0].shape[0])
                            or real(*a, **kw))
    return calls


def _fp8_layer(activation, weight="tensor"):
    from kvyard.layers import quantized_linear as ql
    from kvyard.layers.linear import Linear

    k = 256
    scheme = ql.Fp8Scheme(weight, activation, scale_name="weight_scale_inv" if weight == "block" else "weight_scale")
    layer = Linear(k, [64, 32], method=ql.Fp8LinearMethod(torch.float32, "cpu", scheme))
    for shard, rows in enumerate((64, 32)):
        if weight == "block":
            layer.load_tensor(shard, "weight", (torch.randn(rows, k)).to(torch.float8_e4m3fn))
            layer.load_tensor(shard, "weight_scale_inv", torch.rand(-(-rows // 128), 2) * 0.01)
            continue
        wq, scale = qm.fp8_per_tensor(torch.randn(rows, k) * 0.05)
        layer.load_tensor(shard, "weight", wq)
        layer.load_tensor(shard, "weight_scale", scale)
        if activation == "static":
            layer.load_tensor(shard, "input_scale", torch.tensor(0.01 * (shard + 1)))
    layer.process_after_loading()
    return layer


@pytest.mark.parametrize("activation,weight", [("dynamic", "tensor"), ("static", "tensor"), ("none", "tensor"),
                                               ("dynamic", "block")])
def test_fp8_layer_routes_decode_sizes_to_the_w8a16_gemv(kernel_calls, activation, weight):
    from quant_helpers import layer_both_ways

    torch.manual_seed(5)
    layer = _fp8_layer(activation, weight)
    dense = layer.method.dequantize(layer)
    for m in (1, 16):                  # forced onto the kernels: x against the dequantized weight
        x = torch.randn(m, 256)
        torch.testing.assert_close(layer_both_ways(layer, x)[1], x @ dense.t(), **F32)
    x = torch.randn(17, 256)           # 17 rows: the GEMM path, its quantization bit-identical to torch's
    cpu, forced = layer_both_ways(layer, x)  # on CUDA (block scales: the Triton block GEMM sums in its order;
    exact = weight != "block" and activation == "static"   # dynamic: the CPU divides amax by 448 exactly)
    torch.testing.assert_close(forced, cpu, **(dict(rtol=0, atol=0) if exact else F32))
    assert kernel_calls["gemv"] == [1, 16]
    assert kernel_calls["quant"] == ([17] if activation in ("dynamic", "static") and weight != "block" else [])


_COMPILE_SM90 = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kvyard.kernels.triton_ops import fp8_gemv as fg, fp8_quant as fq

def build(fn, pointers, ints, consts, cfg, floats=()):
    sig = {**pointers, **{name: "i32" for name in ints}, **{name: "fp32" for name in floats},
           **{name: "constexpr" for name in consts}}
    names = list(sig)
    aligned = [i for i, name in enumerate(names) if name in pointers or name in ("K", "K_PER_SPLIT", "stride_xm")]
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()},
                    attrs={(i,): [["tt.divisibility", 16]] for i in aligned})   # what a launch specializes
    try:
        return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}).asm["ptx"]
    except RuntimeError as exc:
        if str(exc).startswith("Cannot find") and "ptxas" in str(exc):
            sys.exit(3)                    # no CUDA toolchain in this Triton install
        raise

gemv = (dict(x_ptr="*bf16", w_ptr="*fp8e4nv", sw_ptr="*fp32", out_ptr="*bf16", y_ptr="*bf16", cnt_ptr="*i32"),
        ["M", "N", "K", "K_PER_SPLIT", "stride_xm", "stride_sw"])
for block_m, scale_k in ((1, 0), (fg.MAX_M, 128)):
    cfg = next(c for c in fg.CONFIGS if fg.config_fits(c, block_m, scale_k))
    ptx = build(fg._w8a16_kernel, *gemv, dict(SCALE_K=scale_k, PARTIAL=False, FUSE=False, BLOCK_M=block_m,
                                             IEEE=False, **cfg.kwargs), cfg)
    if block_m == 1:
        assert "ld.global.v4" in ptx and "mma" not in ptx, "M == 1: 16-byte weight loads, CUDA cores"
    else:
        assert "mma" in ptx, "M > 1: a tensor-core dot"
# split K summed in the same launch: partial stores, a CTA barrier, one gpu-scope acq_rel
# increment, then the last program's L1-bypassing loads of the partials
cfg = next(c for c in fg.CONFIGS if fg.config_fits(c, 1, 0))
split = (dict(gemv[0], out_ptr="*fp32"), gemv[1])
ptx = build(fg._w8a16_kernel, *split, dict(SCALE_K=0, PARTIAL=True, FUSE=True, BLOCK_M=1, IEEE=False,
                                          **cfg.kwargs), cfg)
atom = ptx.index("atom.global.gpu.acq_rel.add")
assert "bar.sync" in ptx[ptx.rindex("st.global.b32", 0, atom):atom], "partial stores, barrier, increment"
assert ptx.count("atom.global") == 1 and "ld.global.cg" in ptx[atom:]
quant = (dict(x_ptr="*bf16", q_ptr="*fp8e4nv", s_ptr="*fp32"), ["K", "stride_xm", "stride_qm"])
for fn in (fq._per_token_kernel, fq._static_kernel):
    build(fn, *quant, dict(BLOCK=fq.BLOCK), triton.Config({}, num_warps=4, num_stages=1))
from kvyard.kernels.triton_ops import kv_write
sig = dict(K="*bf16", V="*bf16", LOC="*i64", K_BUF="*fp8e4nv", V_BUF="*fp8e4nv")
build(kv_write._kv_write_kernel, sig, ["stride_kt", "stride_vt", "stride_kb", "stride_vb", "WIDTH"],
      dict(BLOCK=1024, FP8=True, FMAX=448.0, MANT=3, EMIN=-6, PDL=False), triton.Config({}, num_warps=4), ["k_inv", "v_inv"])
"""


def test_kernels_compile_for_sm90():
    """The interpreter runs the kernels as Python; this compiles them to H100 code (Triton's
    bundled ptxas, no GPU needed; a process without TRITON_INTERPRET): the M == 1 body loads the
    weight in 16-byte vectors without a tensor-core tile, the 2..16 body uses one; a K split
    summed in the same launch orders its partial stores before a gpu-scope acq_rel counter
    increment and reads the partials back past L1."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SM90], env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode == 3:
        pytest.skip("no ptxas in this Triton install")
    assert proc.returncode == 0, proc.stderr[-3000:]
