"""The `flex_attention` plugin over the paged pool against dense attention in float64; and its
block mask built from the page table."""
import pytest
import torch

from attention_reference import dense_attention
from forward_harness import Harness, PagedKV, Seq
from kvyard.layers.attention import Attention
from kvyard.plugins import PluginManager
import kvyard_plugins.attention.flex_attention as flex_plugin
from kvyard_plugins.attention.flex_attention_backend import BLOCK, block_mask_from_dense

KV_HEADS = 2
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def make_backend(kv: PagedKV, heads: int, head_dim: int):
    pm = PluginManager(autoload=False)
    pm.add_plugin(flex_plugin)
    return pm.registry("attention_backends").get("flex_attention")(kv.backend_config(heads, head_dim))


def new_request(kv, cached, new, heads, dim, dtype):
    seq = Seq(kv.new_row(), list(range(cached + new)), kv_len=cached)
    k_all, v_all = (torch.randn(cached + new, KV_HEADS, dim).to(dtype) for _ in range(2))
    if cached:
        kv.pool.set_kv(0, kv.allocate(seq.row, 0, cached), k_all[:cached], v_all[:cached])
    return seq, torch.randn(new, heads, dim).to(dtype), k_all, v_all


@pytest.mark.parametrize("page_size,group,head_dim,dtype,mask_form", [
    (1, 1, 64, torch.float32, "dense"), (16, 3, 128, torch.float32, "dense"),
    (16, 8, 64, torch.bfloat16, "dense"), (16, 3, 64, torch.float32, "vectors")])
def test_extend_and_decode_match_dense(page_size, group, head_dim, dtype, mask_form):
    torch.manual_seed(page_size + group + head_dim)
    heads = KV_HEADS * group
    kv = PagedKV(num_layers=1, num_kv_heads=KV_HEADS, head_dim=head_dim, num_pages=1024 // page_size,
                 page_size=page_size, dtype=dtype, seed=page_size)
    backend = make_backend(kv, heads, head_dim)
    if mask_form == "vectors":    # the CUDA path's mask_mod, run eagerly here
        backend.compiled = True
    layer = Attention(layer_id=0, num_heads=heads, num_kv_heads=KV_HEADS, head_dim=head_dim)
    harness = Harness(model=None, backend=backend, kv=kv)
    # mixed batch; the last request spans two query tiles and several key tiles
    shapes = [(0, 9), (1, 7), (17, 5), (20, 1), (100, 150)]
    reqs = [new_request(kv, p, n, heads, head_dim, dtype) for p, n in shapes]
    fb = harness.extend_batch([r[0] for r in reqs], [n for _, n in shapes])
    backend.init_forward_metadata(fb)
    q = torch.cat([r[1] for r in reqs])
    k_new = torch.cat([k[p:] for (p, _), (_, _, k, _) in zip(shapes, reqs)])
    v_new = torch.cat([v[p:] for (p, _), (_, _, _, v) in zip(shapes, reqs)])
    out = layer(q.flatten(1), k_new.flatten(1), v_new.flatten(1), fb)
    want = torch.cat([dense_attention(r[1], r[2], r[3], p) for (p, _), r in zip(shapes, reqs)])
    assert out.dtype == dtype and (out.double() - want).abs().max() < TOL[dtype]

    # one decode step on top of everything
    for seq, _, _, _ in reqs:
        seq.kv_len = len(seq.tokens)
        seq.tokens.append(0)
    fb = harness.decode_batch([r[0] for r in reqs])
    backend.init_forward_metadata(fb)
    q = torch.randn(len(reqs), heads, head_dim).to(dtype)
    k_step, v_step = (torch.randn(len(reqs), KV_HEADS, head_dim).to(dtype) for _ in range(2))
    out = layer(q.flatten(1), k_step.flatten(1), v_step.flatten(1), fb)
    want = torch.cat([dense_attention(q[i:i + 1], torch.cat([r[2], k_step[i:i + 1]]),
                                      torch.cat([r[3], v_step[i:i + 1]]), r[2].shape[0])
                      for i, r in enumerate(reqs)])
    assert (out.double() - want).abs().max() < TOL[dtype]


def test_padded_decode_row_gives_zeros():
    torch.manual_seed(0)
    kv = PagedKV(num_layers=1, num_kv_heads=KV_HEADS, head_dim=64, num_pages=64)
    backend = make_backend(kv, KV_HEADS, 64)
    layer = Attention(layer_id=0, num_heads=KV_HEADS, num_kv_heads=KV_HEADS, head_dim=64)
    seq, q, k_all, v_all = new_request(kv, 5, 1, KV_HEADS, 64, torch.float32)
    fb = Harness(model=None, backend=backend, kv=kv).decode_batch([seq])
    fb.batch_size, fb.real_batch_size = 2, 1
    fb.req_pool_indices = torch.tensor([seq.row, 0])
    fb.out_cache_loc = torch.cat([fb.out_cache_loc, torch.tensor([0])])
    fb.seq_lens, fb.seq_lens_cpu = torch.tensor([6, 0]), [6, 0]
    fb.extend_seq_lens_cpu, fb.extend_prefix_lens_cpu = [1, 1], [5, 0]
    backend.init_forward_metadata(fb)
    q2 = torch.cat([q, torch.randn(1, KV_HEADS, 64)])
    k2, v2 = torch.cat([k_all[-1:], torch.zeros(1, KV_HEADS, 64)]), torch.cat([v_all[-1:], torch.zeros(1, KV_HEADS, 64)])
    out = layer(q2.flatten(1), k2.flatten(1), v2.flatten(1), fb)
    assert torch.isfinite(out).all() and (out[1] == 0).all()
    torch.testing.assert_close(out[:1].double(), dense_attention(q, k_all, v_all, 5), rtol=0, atol=2e-5)


def test_block_mask_tiles_are_empty_partial_or_full():
    t, length = BLOCK + 5, 3 * BLOCK
    allowed = torch.zeros(t, length, dtype=torch.bool)
    allowed[:BLOCK, :BLOCK] = True                    # tile (0, 0) full
    allowed[:3, 2 * BLOCK:2 * BLOCK + 1] = True       # tile (0, 2) partial
    allowed[BLOCK:, BLOCK:2 * BLOCK] = True           # tile (1, 1) is an edge tile: partial
    mask = block_mask_from_dense(allowed, lambda b, h, q, k: allowed[q, k])
    assert mask.full_kv_num_blocks[0, 0].tolist() == [1, 0]
    assert mask.full_kv_indices[0, 0, 0, 0].item() == 0
    assert mask.kv_num_blocks[0, 0].tolist() == [1, 1]
    assert mask.kv_indices[0, 0, 0, 0].item() == 2 and mask.kv_indices[0, 0, 1, 0].item() == 1
    assert mask.to_dense()[0, 0].tolist() == [[1, 0, 1], [0, 1, 0]]   # tiles ever visited


def test_plugin_registers_flex_attention():
    pm = PluginManager(autoload=False)
    pm.add_plugin(flex_plugin)
    assert pm.registry("attention_backends").get("flex_attention").name == "flex_attention"
