"""--prefill-attention-backend / --decode-attention-backend: resolution and the hybrid backend."""
import logging

import pytest
import torch

from forward_harness import Harness, PagedKV, Seq
from kvyard.executor.backend_select import resolve_attention_backends
from kvyard.attention.hybrid import HybridAttentionBackend, build_attention_backend
from kvyard.layers.attention import Attention
from kvyard.plugins import PluginError
from kvyard.server_args import ServerArgs


def test_resolution_per_mode(caplog):
    assert resolve_attention_backends("torch_native", None, None, "cpu") == ("torch_native", "torch_native")
    assert resolve_attention_backends("auto", None, None, "cpu") == ("torch_native", "torch_native")
    with caplog.at_level(logging.INFO, logger="kvyard.executor.backend_select"):
        assert resolve_attention_backends("auto", "flex_attention", None, "cpu") == ("flex_attention", "torch_native")
    assert "hybrid" in caplog.text
    assert resolve_attention_backends("no_such", "torch_native", "flex_attention", "cpu") == \
        ("torch_native", "flex_attention")                      # the base is not needed then
    with pytest.raises(PluginError, match="no_such"):
        resolve_attention_backends("auto", None, "no_such", "cpu")


def test_server_args_check_the_per_mode_names():
    with pytest.raises(ValueError, match="decode_attention_backend"):
        ServerArgs(decode_attention_backend="no_such_backend")
    assert ServerArgs(prefill_attention_backend="flex_attention").prefill_attention_backend == "flex_attention"


def test_hybrid_dispatches_each_mode_to_its_backend():
    kv = PagedKV(num_layers=1, num_kv_heads=2, head_dim=8, num_pages=64)
    config = kv.backend_config(4, 8)
    single, name = build_attention_backend(config, "torch_native", "torch_native")
    assert name == "torch_native" and not isinstance(single, HybridAttentionBackend)
    hybrid, name = build_attention_backend(config, "flex_attention", "torch_native")
    assert name == "hybrid(prefill=flex_attention, decode=torch_native)"
    assert isinstance(hybrid, HybridAttentionBackend) and not hybrid.supports_cuda_graph

    seen = []
    for backend in (hybrid.prefill, hybrid.decode):
        original = backend.forward

        def spy(*args, _b=backend, _f=original, **kwargs):
            seen.append(_b.name)
            return _f(*args, **kwargs)
        backend.forward = spy

    torch.manual_seed(0)
    layer = Attention(layer_id=0, num_heads=4, num_kv_heads=2, head_dim=8)
    harness = Harness(model=None, backend=hybrid, kv=kv)
    seq = Seq(kv.new_row(), list(range(6)))
    q, k, v = torch.randn(6, 32), torch.randn(6, 16), torch.randn(6, 16)
    fb = harness.extend_batch([seq], [5])
    hybrid.init_forward_metadata(fb)
    prefill_out = layer(q[:5], k[:5], v[:5], fb)
    seq.kv_len = 5
    fb = harness.decode_batch([seq])
    hybrid.init_forward_metadata(fb)
    decode_out = layer(q[5:], k[5:], v[5:], fb)
    assert seen == ["flex_attention", "torch_native"]

    # the same steps on torch_native alone: the decode backend read the prefill backend's k/v
    kv2 = PagedKV(num_layers=1, num_kv_heads=2, head_dim=8, num_pages=64)
    plain, _ = build_attention_backend(config, "torch_native", "torch_native")
    harness2 = Harness(model=None, backend=plain, kv=kv2)
    seq2 = Seq(kv2.new_row(), list(range(6)))
    fb = harness2.extend_batch([seq2], [5])
    plain.init_forward_metadata(fb)
    torch.testing.assert_close(prefill_out, layer(q[:5], k[:5], v[:5], fb), rtol=1e-5, atol=1e-5)
    seq2.kv_len = 5
    fb = harness2.decode_batch([seq2])
    plain.init_forward_metadata(fb)
    torch.testing.assert_close(decode_out, layer(q[5:], k[5:], v[5:], fb), rtol=1e-5, atol=1e-5)


def test_hybrid_graph_hooks_go_to_the_backend_of_the_mode():
    """Decode graphs are the decode backend's, extend graphs (speculative verify) the prefill one's."""
    from types import SimpleNamespace

    from kvyard.attention import AttentionBackend
    from kvyard.forward_batch import ForwardMode

    class Recording(AttentionBackend):
        supports_cuda_graph = True

        def __init__(self, name, extend_graphs):
            self.name, self.supports_extend_graph, self.calls = name, extend_graphs, []

        def forward_extend(self, q, layer, fb): ...

        def forward_decode(self, q, layer, fb): ...

        def init_cuda_graph_state(self, max_bs):
            self.calls.append("state")

        def init_extend_graph_state(self, max_bs, tokens_per_req):
            self.calls.append(("extend state", tokens_per_req))

        def init_forward_metadata_capture(self, fb):
            self.calls.append(("capture", fb.mode.name))

        def init_forward_metadata_replay(self, fb):
            self.calls.append(("replay", fb.mode.name))

    kv = PagedKV(num_layers=1, num_kv_heads=2, head_dim=8, num_pages=8)
    prefill, decode = Recording("p", True), Recording("d", False)
    hybrid = HybridAttentionBackend(kv.backend_config(4, 8), prefill, decode)
    assert hybrid.supports_cuda_graph and hybrid.supports_extend_graph
    hybrid.init_cuda_graph_state(4)
    hybrid.init_extend_graph_state(4, 3)
    for mode in (ForwardMode.DECODE, ForwardMode.EXTEND):
        hybrid.init_forward_metadata_capture(SimpleNamespace(mode=mode))
        hybrid.init_forward_metadata_replay(SimpleNamespace(mode=mode))
    assert decode.calls == ["state", ("capture", "DECODE"), ("replay", "DECODE")]
    assert prefill.calls == [("extend state", 3), ("capture", "EXTEND"), ("replay", "EXTEND")]
    assert not HybridAttentionBackend(kv.backend_config(4, 8), decode, prefill).supports_extend_graph
