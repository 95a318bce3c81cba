"""The `flashinfer` attention plugin on the CPU.

* The page table (flashinfer_index.py) read back the way flashinfer's kernels read it covers
  exactly req_to_token[row, :seq_len] of every request: page sizes 1 and 16, scattered pages,
  a prefix shared between requests, lengths on and off page boundaries.
* The backend, driven through a pure-torch model of flashinfer's wrappers (fake_flashinfer.py),
  matches torch_native on random paged batches: extend with cached prefixes, decode, GQA groups
  1 and 4 (the tensor-core decode switch), page sizes 1 and 16, bfloat16; the CUDA-graph hooks
  plan into their preallocated buffers and a replayed batch reads only those.
* Without the library or a CUDA device, selecting it fails with one clear line; the plugin
  modules import without flashinfer.
The real library on a GPU: tests/gpu/test_flashinfer.py.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import replace

import pytest
import torch

import fake_flashinfer
from forward_harness import Harness, PagedKV, Seq
from kvyard.attention import AttentionConfig
from kvyard.layers.attention import Attention
from kvyard.plugins import PluginManager
import kvyard_plugins.attention.flashinfer as flashinfer_plugin
import kvyard_plugins.attention.flashinfer_backend as backend_mod
from kvyard_plugins.attention.flashinfer_index import (build_paged_kv_index, page_counts, paged_view,
                                                        qo_indptr)
from kvyard_plugins.attention.torch_native_backend import TorchNativeBackend

KV_HEADS = 2
DTYPE = torch.bfloat16
TOL = 2e-2    # both sides accumulate in float32 and round the output to bf16 (2^-8 relative)


def slots_read(index, i: int, page_size: int) -> list[int]:
    """The slots a flashinfer kernel reads for request i: every entry of its pages but the
    last, of which kv_last_page_len[i]."""
    start, end = int(index.kv_indptr[i]), int(index.kv_indptr[i + 1])
    pages = index.kv_indices.cpu().long()[start:end]
    slots = (pages[:, None] * page_size + torch.arange(page_size)).flatten()
    return slots[:(end - start - 1) * page_size + int(index.kv_last_page_len[i])].tolist()


# -- page table ----------------------------------------------------------------------------------
@pytest.mark.parametrize("page_size", [1, 16])
def test_page_table_covers_exactly_each_requests_slots(page_size):
    kv = PagedKV(num_layers=1, num_kv_heads=KV_HEADS, head_dim=64, num_pages=64, page_size=page_size,
                 max_context=128, seed=page_size)
    lengths = [1, page_size, page_size + 1, 3 * page_size - 1, 45]
    rows = []
    for n in lengths:
        row = kv.new_row()
        kv.allocate(row, 0, n)
        rows.append(row)
    shared = kv.new_row()                        # a prefix-cache hit: two pages of row 4's slots
    kv.share_prefix(rows[4], shared, 2 * page_size)
    kv.allocate(shared, 2 * page_size, 5)
    rows.append(shared)
    lengths.append(2 * page_size + 5)
    order = [3, 0, 5, 1, 4, 2]                   # batch order differs from row order
    req_pool_indices = torch.tensor([rows[i] for i in order])
    seq_lens = [lengths[i] for i in order]
    index = build_paged_kv_index(kv.req_to_token, req_pool_indices, seq_lens, page_size)
    assert index.kv_indptr.dtype == index.kv_indices.dtype == index.kv_last_page_len.dtype == torch.int32
    assert index.num_pages == sum(-(-n // page_size) for n in seq_lens)
    for i, (row, n) in enumerate(zip(req_pool_indices.tolist(), seq_lens)):
        assert slots_read(index, i, page_size) == kv.req_to_token[row, :n].tolist()
    assert slots_read(index, 2, page_size)[:2 * page_size] == kv.req_to_token[rows[4], :2 * page_size].tolist()


def test_page_counts_and_qo_indptr():
    pages, indptr, last = page_counts([1, 16, 17, 32, 33], 16)
    assert pages.tolist() == [1, 1, 2, 2, 3]
    assert indptr.tolist() == [0, 1, 2, 4, 6, 9]
    assert last.tolist() == [1, 16, 1, 16, 1]
    assert qo_indptr([3, 1, 4]).tolist() == [0, 3, 4, 8]
    with pytest.raises(ValueError, match="seq_lens"):
        page_counts([4, 0], 1)
    with pytest.raises(ValueError, match="page_size"):
        page_counts([4], 0)


def test_paged_view_is_the_pool_without_a_copy():
    buffer = torch.randn(48, KV_HEADS, 64)
    pages = paged_view(buffer, 16)
    assert pages.shape == (3, 16, KV_HEADS, 64) and pages.data_ptr() == buffer.data_ptr()
    assert torch.equal(pages[2, 5], buffer[2 * 16 + 5])
    with pytest.raises(ValueError, match="page_size"):
        paged_view(buffer, 5)


# -- backend vs torch_native (through the model of the library) ------------------------------------
@pytest.fixture
def with_fake_library(monkeypatch):
    monkeypatch.setattr(backend_mod, "load_flashinfer", lambda device: fake_flashinfer)


def make_pair(kv: PagedKV, heads: int, head_dim: int, **options):
    cfg = replace(kv.backend_config(heads, head_dim), options=options)
    return backend_mod.FlashInferBackend(cfg), TorchNativeBackend(cfg)


def add_request(kv: PagedKV, cached: int, new: int, heads: int, dim: int):
    """A Seq whose first ``cached`` tokens have k/v in every layer of the pool, plus random
    q/k/v for its ``new`` tokens."""
    seq = Seq(kv.new_row(), list(range(cached + new)), kv_len=cached)
    if cached:
        loc = kv.allocate(seq.row, 0, cached)
        for layer in range(kv.pool.num_layers):
            kv.pool.set_kv(layer, loc, torch.randn(cached, KV_HEADS, dim).to(DTYPE),
                           torch.randn(cached, KV_HEADS, dim).to(DTYPE))
    q, k, v = (torch.randn(new, h, dim).to(DTYPE) for h in (heads, KV_HEADS, KV_HEADS))
    return seq, q, k, v


def run_both(fb, backends, layer, q, k, v):
    outs = []
    for backend in backends:
        fb.attn_backend = backend
        backend.init_forward_metadata(fb)
        outs.append(layer(q.flatten(1), k.flatten(1), v.flatten(1), fb))
    return outs


CASES = [(1, 1), (16, 4), (16, 1), (1, 4)]   # (page_size, GQA group)


@pytest.mark.parametrize("page_size,group", CASES)
def test_extend_with_prefix_matches_torch_native(with_fake_library, page_size, group):
    torch.manual_seed(page_size + group)
    heads, dim = KV_HEADS * group, 64
    kv = PagedKV(num_layers=2, num_kv_heads=KV_HEADS, head_dim=dim, num_pages=256 // page_size + 8,
                 page_size=page_size, dtype=DTYPE, seed=group)
    flash, native = make_pair(kv, heads, dim)
    shapes = [(0, 9), (1, 7), (17, 5), (20, 1), (33, 40)]   # (cached, new) per request
    reqs = [add_request(kv, c, n, heads, dim) for c, n in shapes]
    fb = Harness(model=None, backend=flash, kv=kv).extend_batch([r[0] for r in reqs], [n for _, n in shapes])
    q, k, v = (torch.cat([r[i] for r in reqs]) for i in (1, 2, 3))
    layer = Attention(layer_id=1, num_heads=heads, num_kv_heads=KV_HEADS, head_dim=dim)
    got, want = run_both(fb, (flash, native), layer, q, k, v)
    assert got.dtype == DTYPE and got.shape == (q.shape[0], heads * dim)
    assert (got.float() - want.float()).abs().max().item() < TOL
    assert flash.prefill_wrapper.plans == 1 and flash.prefill_wrapper.causal


@pytest.mark.parametrize("page_size,group", CASES)
def test_decode_matches_torch_native(with_fake_library, page_size, group):
    torch.manual_seed(10 * page_size + group)
    heads, dim = KV_HEADS * group, 64
    kv = PagedKV(num_layers=1, num_kv_heads=KV_HEADS, head_dim=dim, num_pages=256 // page_size + 8,
                 page_size=page_size, dtype=DTYPE, seed=group + 1)
    flash, native = make_pair(kv, heads, dim)
    assert flash.decode_wrapper.use_tensor_cores == (group >= 4)
    reqs = [add_request(kv, n, 1, heads, dim) for n in (1, 15, 16, 33, 70)]
    fb = Harness(model=None, backend=flash, kv=kv).decode_batch([r[0] for r in reqs])
    q, k, v = (torch.cat([r[i] for r in reqs]) for i in (1, 2, 3))
    layer = Attention(layer_id=0, num_heads=heads, num_kv_heads=KV_HEADS, head_dim=dim)
    got, want = run_both(fb, (flash, native), layer, q, k, v)
    assert (got.float() - want.float()).abs().max().item() < TOL


def test_one_plan_per_step_shared_by_layers_and_a_custom_scale(with_fake_library):
    torch.manual_seed(5)
    kv = PagedKV(num_layers=3, num_kv_heads=KV_HEADS, head_dim=64, num_pages=64, dtype=DTYPE)
    flash, native = make_pair(kv, 2 * KV_HEADS, 64)
    reqs = [add_request(kv, c, 1, 2 * KV_HEADS, 64) for c in (4, 9)]
    fb = Harness(model=None, backend=flash, kv=kv).decode_batch([r[0] for r in reqs])
    q, k, v = (torch.cat([r[i] for r in reqs]) for i in (1, 2, 3))
    flash.init_forward_metadata(fb)
    for layer_id in range(3):
        layer = Attention(layer_id, 2 * KV_HEADS, KV_HEADS, 64, scaling=0.05 * (layer_id + 1))
        got = layer(q.flatten(1), k.flatten(1), v.flatten(1), fb)
        fb.attn_backend = native
        native.init_forward_metadata(fb)
        want = layer(q.flatten(1), k.flatten(1), v.flatten(1), fb)
        fb.attn_backend = flash
        flash.init_forward_metadata(fb)
        assert (got.float() - want.float()).abs().max().item() < TOL, f"layer {layer_id}"
    assert flash.decode_wrapper.sm_scale == 64 ** -0.5


def test_cuda_graph_hooks_plan_into_preallocated_buffers(with_fake_library):
    """Capture a padded batch of 4 (two real rows, two on the dummy row), then replay the same
    bucket with other requests and lengths: the output equals an eager step's."""
    torch.manual_seed(7)
    page, heads, dim = 16, 4 * KV_HEADS, 64
    kv = PagedKV(num_layers=1, num_kv_heads=KV_HEADS, head_dim=dim, num_pages=64, page_size=page,
                 max_context=128, dtype=DTYPE)
    flash, native = make_pair(kv, heads, dim)
    flash.init_cuda_graph_state(8)
    assert flash.graph_buffers.kv_indices.numel() == 8 * (128 // page)
    layer = Attention(layer_id=0, num_heads=heads, num_kv_heads=KV_HEADS, head_dim=dim)
    harness = Harness(model=None, backend=flash, kv=kv)

    def padded_decode(lengths):
        reqs = [add_request(kv, n, 1, heads, dim) for n in lengths]
        fb = harness.decode_batch([r[0] for r in reqs])
        pad = 4 - len(reqs)
        fb.batch_size = 4
        fb.req_pool_indices = torch.cat([fb.req_pool_indices, torch.zeros(pad, dtype=torch.int64)])
        fb.out_cache_loc = torch.cat([fb.out_cache_loc, torch.zeros(pad, dtype=torch.int64)])
        fb.seq_lens = torch.cat([fb.seq_lens, torch.ones(pad, dtype=torch.int64)])
        fb.seq_lens_cpu = fb.seq_lens_cpu + [1] * pad
        q, k, v = (torch.cat([torch.cat([r[i] for r in reqs]), torch.randn(pad, h, dim).to(DTYPE)])
                   for i, h in ((1, heads), (2, KV_HEADS), (3, KV_HEADS)))
        return fb, q, k, v

    fb, q, k, v = padded_decode([5, 40])
    flash.init_forward_metadata_capture(fb)
    wrapper = fb.attn_metadata.wrapper
    assert wrapper.use_cuda_graph and wrapper.fixed_batch_size == 4 and flash.graph_wrappers == {4: wrapper}
    layer(q.flatten(1), k.flatten(1), v.flatten(1), fb)

    fb2, q2, k2, v2 = padded_decode([17, 3, 64])
    flash.init_forward_metadata_replay(fb2)
    assert fb2.attn_metadata.wrapper is wrapper
    index = fb2.attn_metadata.index
    assert torch.equal(flash.graph_buffers.kv_indptr[:5], index.kv_indptr)
    assert torch.equal(flash.graph_buffers.kv_last_page_len[:4], index.kv_last_page_len)
    got = layer(q2.flatten(1), k2.flatten(1), v2.flatten(1), fb2)
    fb2.attn_backend = native
    native.init_forward_metadata(fb2)
    want = layer(q2.flatten(1), k2.flatten(1), v2.flatten(1), fb2)
    assert (got[:3].float() - want[:3].float()).abs().max().item() < TOL

    with pytest.raises(ValueError, match="batch size 2"):
        fb2.batch_size = 2
        flash.init_forward_metadata_replay(fb2)


def test_extend_graph_hooks_serve_a_padded_verify_batch(with_fake_library):
    """A verify-shaped extend (W = 4 new tokens per request, some shorter) padded into the extend
    graph layout (kvyard.executor.extend_graph_runner): captured at bucket 4, replayed with other
    requests; its real rows equal an eager torch_native extend of the unpadded batch."""
    from kvyard.executor.extend_graph_runner import ExtendInputBuffers, ExtendLayout

    torch.manual_seed(11)
    page, heads, dim, width = 16, 4 * KV_HEADS, 64, 4
    kv = PagedKV(num_layers=1, num_kv_heads=KV_HEADS, head_dim=dim, num_pages=64, page_size=page,
                 max_context=128, dtype=DTYPE)
    flash, native = make_pair(kv, heads, dim)
    flash.init_extend_graph_state(4, width)
    buffers = ExtendInputBuffers(4, width, "cpu")
    graph_fb = buffers.batch(4, kv.pool, kv.req_to_token, flash)
    flash.init_forward_metadata_capture(graph_fb)
    wrapper = graph_fb.attn_metadata.wrapper
    assert wrapper.use_cuda_graph and wrapper.fixed_batch_size == 4 and flash.extend_graph_wrappers == {4: wrapper}
    assert flash.extend_graph_buffers.qo_indptr.tolist() == [0, 4, 8, 12, 16]
    layer = Attention(layer_id=0, num_heads=heads, num_kv_heads=KV_HEADS, head_dim=dim)

    shapes = [(17, 4), (3, 2), (40, 1)]                       # (cached, new) per request
    reqs = [add_request(kv, c, n, heads, dim) for c, n in shapes]
    fb = Harness(model=None, backend=flash, kv=kv).extend_batch([r[0] for r in reqs], [n for _, n in shapes])
    q, k, v = (torch.cat([r[i] for r in reqs]) for i in (1, 2, 3))
    layout = ExtendLayout(fb, width, 4)
    dest = buffers.fill(fb, layout, kv.req_to_token)
    graph_fb.extend_prefix_lens_cpu = layout.prefix
    graph_fb.seq_lens_cpu = [p + width for p in layout.prefix]
    flash.init_forward_metadata_replay(graph_fb)
    assert graph_fb.attn_metadata.wrapper is wrapper

    def padded(t):
        out = torch.zeros(16, *t.shape[1:], dtype=t.dtype)
        out[dest] = t
        return out

    got = layer(padded(q).flatten(1), padded(k).flatten(1), padded(v).flatten(1), graph_fb)[dest]
    fb.attn_backend = native
    native.init_forward_metadata(fb)
    want = layer(q.flatten(1), k.flatten(1), v.flatten(1), fb)
    assert (got.float() - want.float()).abs().max().item() < TOL
    with pytest.raises(ValueError, match="no extend graph was captured for batch size 2"):
        graph_fb.batch_size = 2
        flash.init_forward_metadata_replay(graph_fb)


def test_capture_needs_graph_state(with_fake_library):
    kv = PagedKV(num_layers=1, num_kv_heads=KV_HEADS, head_dim=64, num_pages=8, dtype=DTYPE)
    flash, _ = make_pair(kv, KV_HEADS, 64)
    fb = Harness(model=None, backend=flash, kv=kv).decode_batch([add_request(kv, 3, 1, KV_HEADS, 64)[0]])
    with pytest.raises(RuntimeError, match="init_cuda_graph_state"):
        flash.init_forward_metadata_capture(fb)


# -- configuration and availability ---------------------------------------------------------------
def base_config(**overrides) -> AttentionConfig:
    cfg = AttentionConfig(num_heads=8, num_kv_heads=2, head_dim=64, dtype=DTYPE, device="cuda",
                          page_size=1, max_context_len=64, max_batch_size=4)
    return replace(cfg, **overrides)


@pytest.mark.parametrize("overrides,field", [
    (dict(options={"flashinfer_prefill_backend": "fa9"}), "flashinfer_prefill_backend"),
    (dict(options={"flashinfer_decode_tensor_cores": "yes"}), "flashinfer_decode_tensor_cores"),
    (dict(options={"flashinfer_workspace_mb": 0}), "flashinfer_workspace_mb"),
    (dict(dtype=torch.float32), "dtype"),
    (dict(head_dim=40), "head_dim"),
    (dict(num_heads=6, num_kv_heads=4), "num_heads"),
])
def test_bad_settings_name_their_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        backend_mod.FlashInferBackend(base_config(**overrides))


def test_options_are_read(with_fake_library, monkeypatch):
    kv = PagedKV(num_layers=1, num_kv_heads=KV_HEADS, head_dim=64, num_pages=8, dtype=DTYPE)
    flash, _ = make_pair(kv, 8 * KV_HEADS, 64, flashinfer_prefill_backend="auto",
                         flashinfer_decode_tensor_cores=False, flashinfer_workspace_mb=2)
    assert flash.prefill_wrapper.backend == "auto" and not flash.decode_tensor_cores
    assert flash.workspace.numel() == 2 << 20


def test_unavailable_on_the_cpu_is_one_clear_line():
    pm = PluginManager(autoload=False)
    pm.add_plugin(flashinfer_plugin)
    cls = pm.registry("attention_backends").get("flashinfer")
    with pytest.raises(ValueError) as err:
        cls(base_config(device="cpu"))
    message = str(err.value)
    assert message.startswith(backend_mod.UNAVAILABLE) and "\n" not in message


def test_unavailable_without_the_package_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "flashinfer", None)     # makes `import flashinfer` fail
    with pytest.raises(ValueError) as err:
        backend_mod.FlashInferBackend(base_config())
    message = str(err.value)
    assert message.startswith(backend_mod.UNAVAILABLE) and "importing it failed" in message
    assert "\n" not in message


def test_plugin_modules_import_without_flashinfer(monkeypatch):
    monkeypatch.setitem(sys.modules, "flashinfer", None)
    for name in ("kvyard_plugins.attention.flashinfer", "kvyard_plugins.attention.flashinfer_index",
                 "kvyard_plugins.attention.flashinfer_backend"):
        importlib.reload(importlib.import_module(name))


def test_registered_through_the_entry_point():
    entry = PluginManager().registry("attention_backends").entry("flashinfer")
    assert entry.factory == "kvyard_plugins.attention.flashinfer_backend:FlashInferBackend"
    assert entry.distribution == "kvyard"


def test_auto_skips_flashinfer_where_it_cannot_run(monkeypatch):
    """On CUDA "auto" prefers flashinfer, but only where the library is installed."""
    import kvyard_plugins.attention.torch_native as native_plugin
    import kvyard_plugins.attention.triton as triton_plugin
    from kvyard.executor.backend_select import resolve_attention_backend
    from kvyard.plugins import reset_plugin_manager

    pm = PluginManager(autoload=False)
    for plugin in (flashinfer_plugin, triton_plugin, native_plugin):
        pm.add_plugin(plugin)
    reset_plugin_manager(pm)
    try:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setitem(sys.modules, "flashinfer", None)            # not installed
        assert resolve_attention_backend("auto", "cuda") == "triton"
        assert resolve_attention_backend("flashinfer", "cuda") == "flashinfer"   # by name: its error
        monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer)  # installed
        assert resolve_attention_backend("auto", "cuda") == "flashinfer"
        assert resolve_attention_backend("auto", "cpu") == "torch_native"
    finally:
        reset_plugin_manager(None)
