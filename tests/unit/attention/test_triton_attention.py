"""The `triton` attention plugin's kernels, run in the Triton CPU interpreter, against dense
attention computed in float64 on unpaged tensors.

Cases: page sizes 1 and 16; prefixes 0, 1 and across a page boundary; GQA ratios 1, 3 and 8;
head dims 64 and 128; mixed-length batches (one request spans two query blocks); float32 and
bfloat16. Tolerances (max abs error vs the float64 reference, outputs are O(1)):
  float32   2e-5  (float32 accumulation, exp2-based online softmax)
  bfloat16  2e-2  (bf16 inputs and output: the output rounding alone is up to 2^-8 relative; the
                   interpreter rounds float32 -> bf16 toward zero, and the split partials are
                   kept in bf16 unless --triton-attention-reduce-in-fp32)
The full grid is marked slow; an unmarked subset covers every axis at least once.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported anywhere in this process

import itertools

import pytest
import torch

pytest.importorskip("triton")

from attention_reference import dense_attention  # noqa: E402
from forward_harness import Harness, PagedKV, Seq  # noqa: E402
from kvyard.layers.attention import Attention  # noqa: E402
from kvyard.plugins import PluginManager  # noqa: E402
import kvyard_plugins.attention.triton as triton_plugin  # noqa: E402

KV_HEADS = 2
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
# (cached prefix, new tokens) per request: no prefix; one cached token; a prefix that ends past a
# 16-token page boundary; a single new token on a prefix; a long request spanning 2 query blocks
EXTEND_SHAPES = [(0, 9), (1, 7), (17, 5), (20, 1), (30, 70)]
DECODE_LENGTHS = [1, 17, 6, 33, 130]   # cached tokens before the step


def make_backend(kv: PagedKV, heads: int, head_dim: int, **options):
    pm = PluginManager(autoload=False)
    pm.add_plugin(triton_plugin)
    cls = pm.registry("attention_backends").get("triton")
    cfg = kv.backend_config(heads, head_dim)
    return cls(type(cfg)(**{**cfg.__dict__, "options": options}))


def new_request(kv: PagedKV, layer_id: int, cached: int, new: int, heads: int, dim: int, dtype):
    """A Seq whose first ``cached`` tokens' k/v are in the pool; its tensors (q of the new tokens,
    k/v of all tokens) in ``dtype``."""
    seq = Seq(kv.new_row(), list(range(cached + new)), kv_len=cached)
    k_all = torch.randn(cached + new, KV_HEADS, dim).to(dtype)
    v_all = torch.randn(cached + new, KV_HEADS, dim).to(dtype)
    if cached:
        loc = kv.allocate(seq.row, 0, cached)
        kv.pool.set_kv(layer_id, loc, k_all[:cached], v_all[:cached])
    return seq, torch.randn(new, heads, dim).to(dtype), k_all, v_all


def run_extend(page_size: int, group: int, head_dim: int, dtype, shapes=EXTEND_SHAPES):
    torch.manual_seed(page_size * 1000 + group * 10 + head_dim)
    heads = KV_HEADS * group
    kv = PagedKV(num_layers=2, num_kv_heads=KV_HEADS, head_dim=head_dim, num_pages=512 // page_size,
                 page_size=page_size, dtype=dtype, seed=page_size)
    backend = make_backend(kv, heads, head_dim)
    layer = Attention(layer_id=1, num_heads=heads, num_kv_heads=KV_HEADS, head_dim=head_dim)
    reqs = [new_request(kv, layer.layer_id, p, n, heads, head_dim, dtype) for p, n in shapes]
    fb = Harness(model=None, backend=backend, kv=kv).extend_batch([r[0] for r in reqs], [n for _, n in shapes])
    backend.init_forward_metadata(fb)
    q = torch.cat([r[1] for r in reqs])
    k_new = torch.cat([k[p:] for (p, _), (_, _, k, _) in zip(shapes, reqs)])
    v_new = torch.cat([v[p:] for (p, _), (_, _, _, v) in zip(shapes, reqs)])
    out = layer(q.flatten(1), k_new.flatten(1), v_new.flatten(1), fb)
    expected = torch.cat([dense_attention(q_i, k_i, v_i, p) for (p, _), (_, q_i, k_i, v_i) in zip(shapes, reqs)])
    assert out.shape == (q.shape[0], heads * head_dim) and out.dtype == dtype
    assert torch.isfinite(out).all()
    err = (out.double() - expected).abs().max().item()
    assert err < TOL[dtype], f"max abs error {err:.3g}"


def run_decode(page_size: int, group: int, head_dim: int, dtype, splits: int = 4,
               reduce_in_fp32: bool = False, lengths=DECODE_LENGTHS):
    torch.manual_seed(page_size * 999 + group * 7 + head_dim + splits)
    heads = KV_HEADS * group
    kv = PagedKV(num_layers=1, num_kv_heads=KV_HEADS, head_dim=head_dim, num_pages=512 // page_size,
                 page_size=page_size, dtype=dtype, seed=page_size + 1)
    backend = make_backend(kv, heads, head_dim, triton_attention_num_kv_splits=splits,
                           triton_attention_reduce_in_fp32=reduce_in_fp32)
    layer = Attention(layer_id=0, num_heads=heads, num_kv_heads=KV_HEADS, head_dim=head_dim)
    reqs = [new_request(kv, 0, n, 1, heads, head_dim, dtype) for n in lengths]
    fb = Harness(model=None, backend=backend, kv=kv).decode_batch([r[0] for r in reqs])
    backend.init_forward_metadata(fb)
    q = torch.cat([r[1] for r in reqs])
    k_new, v_new = torch.stack([r[2][-1] for r in reqs]), torch.stack([r[3][-1] for r in reqs])
    out = layer(q.flatten(1), k_new.flatten(1), v_new.flatten(1), fb)
    expected = torch.cat([dense_attention(q_i, k_i, v_i, n) for n, (_, q_i, k_i, v_i) in zip(lengths, reqs)])
    assert out.shape == (len(lengths), heads * head_dim) and out.dtype == dtype
    err = (out.double() - expected).abs().max().item()
    assert err < TOL[dtype], f"max abs error {err:.3g}"


# -- representative subset (CI) ----------------------------------------------------------------
FAST = [  # (page_size, group, head_dim, dtype): every axis value appears at least once
    (1, 1, 64, torch.float32),
    (16, 3, 128, torch.float32),
    (16, 8, 64, torch.bfloat16),
]


@pytest.mark.parametrize("page_size,group,head_dim,dtype", FAST)
def test_extend_matches_dense(page_size, group, head_dim, dtype):
    run_extend(page_size, group, head_dim, dtype)


@pytest.mark.parametrize("page_size,group,head_dim,dtype", FAST)
def test_decode_matches_dense(page_size, group, head_dim, dtype):
    run_decode(page_size, group, head_dim, dtype)


def test_wide_heads_take_the_small_tiles():
    """MLA's 576-wide heads (padded to 1024) run on the narrow-tile path that fits shared memory."""
    run_extend(1, 1, 576, torch.float32, shapes=[(0, 5), (3, 20)])
    run_decode(1, 1, 576, torch.float32, splits=2, lengths=[7, 33])


def test_decode_split_counts_and_fp32_reduce_agree():
    for splits, fp32 in ((1, False), (7, True), (16, False)):
        run_decode(16, 3, 64, torch.bfloat16, splits=splits, reduce_in_fp32=fp32, lengths=[5, 40, 129])


def test_decode_padded_rows_on_the_dummy_row_give_zeros():
    """CUDA-graph padding: rows on req_to_token row 0 with seq_len 0 (or 1: dummy slot 0)."""
    torch.manual_seed(0)
    kv = PagedKV(num_layers=1, num_kv_heads=KV_HEADS, head_dim=64, num_pages=64)
    backend = make_backend(kv, 2 * KV_HEADS, 64)
    layer = Attention(layer_id=0, num_heads=2 * KV_HEADS, num_kv_heads=KV_HEADS, head_dim=64)
    seq, q, k_all, v_all = new_request(kv, 0, 9, 1, 2 * KV_HEADS, 64, torch.float32)
    fb = Harness(model=None, backend=backend, kv=kv).decode_batch([seq])
    fb.batch_size, fb.real_batch_size = 3, 1
    fb.req_pool_indices = torch.tensor([seq.row, 0, 0])
    fb.out_cache_loc = torch.cat([fb.out_cache_loc, torch.tensor([0, 0])])
    fb.seq_lens, fb.seq_lens_cpu = torch.tensor([10, 0, 1]), [10, 0, 1]
    backend.init_forward_metadata(fb)
    q3 = torch.cat([q, torch.randn(2, 2 * KV_HEADS, 64)])
    k3 = torch.cat([k_all[-1:], torch.zeros(2, KV_HEADS, 64)])
    v3 = torch.cat([v_all[-1:], torch.zeros(2, KV_HEADS, 64)])
    out = layer(q3.flatten(1), k3.flatten(1), v3.flatten(1), fb)
    assert torch.isfinite(out).all()
    assert (out[1] == 0).all()                               # no keys at all: zeros
    torch.testing.assert_close(out[:1].double(), dense_attention(q, k_all, v_all, 9), rtol=0, atol=2e-5)


def test_extend_then_decode_continue_one_sequence():
    """Chunked prefill (two extends) then decode steps: each step sees everything before it."""
    torch.manual_seed(3)
    heads, dim = 3 * KV_HEADS, 64
    kv = PagedKV(num_layers=1, num_kv_heads=KV_HEADS, head_dim=dim, num_pages=8, page_size=16)
    backend = make_backend(kv, heads, dim, triton_attention_num_kv_splits=2)
    layer = Attention(layer_id=0, num_heads=heads, num_kv_heads=KV_HEADS, head_dim=dim)
    harness = Harness(model=None, backend=backend, kv=kv)
    total = 23
    seq = Seq(kv.new_row(), list(range(total)))
    q_all, k_all, v_all = (torch.randn(total, h, dim) for h in (heads, KV_HEADS, KV_HEADS))
    for start, count, mode in ((0, 13, "extend"), (13, 7, "extend"), (20, 1, "decode"), (21, 1, "decode")):
        fb = harness.extend_batch([seq], [count]) if mode == "extend" else harness.decode_batch([seq])
        backend.init_forward_metadata(fb)
        rows = slice(start, start + count)
        out = layer(q_all[rows].flatten(1), k_all[rows].flatten(1), v_all[rows].flatten(1), fb)
        want = dense_attention(q_all[rows], k_all[:start + count], v_all[:start + count], start)
        torch.testing.assert_close(out.double(), want, rtol=0, atol=2e-5)
        seq.kv_len += count


def test_options_are_checked():
    kv = PagedKV(num_layers=1, num_kv_heads=KV_HEADS, head_dim=64, num_pages=4)
    with pytest.raises(ValueError, match="triton_attention_num_kv_splits"):
        make_backend(kv, KV_HEADS, 64, triton_attention_num_kv_splits=0)
    backend = make_backend(kv, KV_HEADS, 64, triton_attention_reduce_in_fp32=True)
    assert backend.mid_dtype == torch.float32 and backend.num_kv_splits == 8


def test_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    kv = PagedKV(num_layers=1, num_kv_heads=KV_HEADS, head_dim=64, num_pages=4)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        make_backend(kv, KV_HEADS, 64)


def test_cuda_graph_hooks_use_preallocated_views():
    kv = PagedKV(num_layers=1, num_kv_heads=KV_HEADS, head_dim=64, num_pages=64)
    backend = make_backend(kv, KV_HEADS, 64)
    backend.init_cuda_graph_state(8)
    seq = new_request(kv, 0, 4, 1, KV_HEADS, 64, torch.float32)[0]
    fb = Harness(model=None, backend=backend, kv=kv).decode_batch([seq])
    backend.init_forward_metadata_capture(fb)
    workspace = backend._graph_workspace[0]
    assert fb.attn_metadata.mid_o.data_ptr() == workspace.data_ptr()
    assert fb.attn_metadata.mid_o.shape[0] == 1
    backend.init_forward_metadata_replay(fb)
    assert fb.attn_metadata.mid_o.data_ptr() == workspace.data_ptr()


# -- the whole grid (on demand: -m slow) -------------------------------------------------------
GRID = list(itertools.product([1, 16], [1, 3, 8], [64, 128], [torch.float32, torch.bfloat16]))


@pytest.mark.slow
@pytest.mark.parametrize("page_size,group,head_dim,dtype", GRID)
def test_extend_grid(page_size, group, head_dim, dtype):
    run_extend(page_size, group, head_dim, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("page_size,group,head_dim,dtype", GRID)
def test_decode_grid(page_size, group, head_dim, dtype):
    run_decode(page_size, group, head_dim, dtype)


def test_split_count_shrinks_as_the_batch_fills_the_gpu():
    """S = min(max, ceil(2 * SMs / (B * Hkv))), at least 1; the interpreter keeps the maximum."""
    kv = PagedKV(num_layers=1, num_kv_heads=KV_HEADS, head_dim=64, num_pages=64)
    backend = make_backend(kv, KV_HEADS, 64, triton_attention_num_kv_splits=8)
    assert backend.sm_count is None and backend.num_splits(1000) == 8
    backend.sm_count = 132
    counts = [backend.num_splits(b) for b in (1, 2, 8, 16, 64, 256, 1024)]
    assert counts[0] == min(8, -(-264 // KV_HEADS)) and counts[-1] == 1
    assert counts == sorted(counts, reverse=True)
    backend.init_cuda_graph_state(256)
    seqs = [new_request(kv, 0, 4, 1, KV_HEADS, 64, torch.float32)[0] for _ in range(2)]
    fb = Harness(model=None, backend=backend, kv=kv).decode_batch(seqs)
    backend.init_forward_metadata_capture(fb)
    assert fb.attn_metadata.mid_o.shape[:3] == (2, KV_HEADS, backend.num_splits(2))


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_cache_meets_q_in_float16(monkeypatch, fp8):
    """An fp8 cache with FP32_DOT off (a GPU's bf16/fp16 model) takes the KV_FP8 path: q, keys,
    values and probabilities as float16. The interpreter always picks FP32_DOT, so it is turned off
    here (a bf16 q becomes float16 before any arithmetic, which numpy runs honestly); both kernels must agree with the
    float32 path over the same fp8 values to the bf16 output's rounding."""
    from kvyard_plugins.attention.triton_kernels import decode_attention as dec
    from kvyard_plugins.attention.triton_kernels import extend_attention as ext
    torch.manual_seed(3)
    heads, kv_heads, dim, lens = 4, 2, 64, [5, 37]
    slots = sum(lens) + 1
    k_buf = (torch.randn(slots, kv_heads, dim) * 2).to(fp8)
    v_buf = (torch.randn(slots, kv_heads, dim) * 2).to(fp8)
    table = torch.zeros(len(lens), max(lens), dtype=torch.int32)
    start = 1
    for i, n in enumerate(lens):
        table[i, :n] = torch.arange(start, start + n, dtype=torch.int32)
        start += n
    rows, seq_lens = torch.arange(len(lens)), torch.tensor(lens)
    q = torch.randn(len(lens), heads, dim).to(torch.bfloat16)   # exact in float16 too

    def decode(q):
        out = torch.empty_like(q)
        mid_o, mid_lse = dec.decode_workspace(len(lens), heads, 2, dim, torch.float32, "cpu")
        dec.decode_attention(q, k_buf, v_buf, out, table, rows, seq_lens, mid_o, mid_lse, dim ** -0.5)
        return out.float()

    def extend(q):      # the last token of each request as a 1-token extend on its prefix
        out = torch.empty_like(q)
        ext.extend_attention(q, k_buf, v_buf, out, table, rows, torch.arange(len(lens)),
                             torch.ones(len(lens), dtype=torch.int64), seq_lens - 1, 1, dim ** -0.5)
        return out.float()

    ref_d, ref_e = decode(q.float()), extend(q.float())
    for mod in (dec, ext):
        monkeypatch.setattr(mod, "fp32_dot", lambda dtype: False)
    assert dec.fp8_kv(k_buf)
    torch.testing.assert_close(decode(q), ref_d, atol=1e-2, rtol=1e-2)   # bf16 output rounding
    torch.testing.assert_close(extend(q), ref_e, atol=1e-2, rtol=1e-2)

