"""The KV-layout contract: the model declares what a token stores, the pool allocates exactly
that, and attention backends serve the layouts they declare and refuse the rest by name."""
from __future__ import annotations

import pytest
import torch

from kvyard.attention import AttentionConfig, check_serves_layout
from kvyard.executor.backend_select import resolve_attention_backend
from kvyard.kv_layout import KVLayout
from kvyard.mem_cache.kv_pool import KVPool
from kvyard.plugins import registry

MLA = KVLayout.mla(num_layers=3, kv_lora_rank=32, qk_rope_head_dim=16)


def config(layout: KVLayout, heads: int = 4) -> AttentionConfig:
    return AttentionConfig(num_heads=heads, num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim,
                           dtype=torch.float32, device="cpu", page_size=1, max_context_len=64,
                           max_batch_size=4, kv_layout=layout)


def test_mla_stores_one_latent_row_per_token():
    assert (MLA.num_kv_heads, MLA.head_dim, MLA.v_head_dim) == (1, 48, 32)
    pool = KVPool.for_layout(10, MLA, torch.float32, "cpu")
    assert pool.k_buffers[0].shape == (10, 1, 48)
    assert pool.v_buffers[2] is pool.k_buffers[2]           # V is read out of the K row
    assert MLA.bytes_per_token(torch.bfloat16) == 3 * 48 * 2
    mha = KVLayout.mha(3, 4, 48)
    assert mha.bytes_per_token(torch.bfloat16) == 3 * 2 * 4 * 48 * 2


def test_latent_write_takes_no_v_and_mha_needs_one():
    pool = KVPool.for_layout(8, MLA, torch.float32, "cpu")
    rows = torch.randn(2, 1, 48)
    pool.set_kv(1, torch.tensor([3, 5]), rows, None)
    torch.testing.assert_close(pool.k_buffer(1)[[3, 5]], rows)
    mha = KVPool(8, 1, 2, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="needs v"):
        mha.set_kv(0, torch.tensor([1]), torch.randn(1, 2, 16), None)


@pytest.mark.parametrize("bad, match", [
    (dict(kind="paged"), "kind"), (dict(num_kv_heads=2), "one latent head"), (dict(v_head_dim=48), "prefix")])
def test_inconsistent_layouts_are_one_line_errors(bad, match):
    fields = dict(kind="mla", num_layers=1, num_kv_heads=1, head_dim=48, v_head_dim=32, **{})
    fields.update(bad)
    with pytest.raises(ValueError, match=match):
        KVLayout(**fields)


def test_backends_refuse_layouts_they_do_not_declare_by_name():
    flex = registry("attention_backends").get("flex_attention")
    with pytest.raises(ValueError, match="'flex_attention' does not serve the 'mla' KV layout"):
        flex(config(MLA))
    for name in ("torch_native", "triton"):
        check_serves_layout(registry("attention_backends").get(name), config(MLA))   # served


def test_auto_picks_a_backend_that_serves_the_layout():
    assert resolve_attention_backend("auto", "cpu", config(MLA)) == "torch_native"
