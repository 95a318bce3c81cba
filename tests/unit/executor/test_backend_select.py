"""core/executor/backend_select.py: automatic choices, each logged with its reason."""
from __future__ import annotations

import argparse
import logging

import pytest
import torch

from kvyard.executor import backend_select
from kvyard.attention import AttentionConfig
from kvyard.attention.timing import AttentionTiming
from kvyard.executor.backend_select import (pick_by_timing, resolve_attention_backend, resolve_attention_backends,
                                   resolve_overlap_schedule)
from kvyard.server_args import ServerArgs


# -- overlap scheduling ------------------------------------------------------------------------
@pytest.mark.parametrize("disable, device, expected", [
    (None, "cuda", True), (None, "cpu", False), (True, "cuda", False), (False, "cpu", True),
    (None, "mps", False)])
def test_overlap_default_per_device_and_the_flag_overrides_it(caplog, disable, device, expected):
    with caplog.at_level(logging.INFO, logger="kvyard.executor.backend_select"):
        assert resolve_overlap_schedule(disable, device) is expected
    assert f"overlap schedule: {'on' if expected else 'off'}" in caplog.text
    assert ("auto on" in caplog.text) == (disable is None)


def test_embedding_models_never_overlap(caplog):
    with caplog.at_level(logging.INFO, logger="kvyard.executor.backend_select"):
        assert resolve_overlap_schedule(False, "cuda", is_generation=False) is False
    assert "embedding model" in caplog.text


def test_disable_overlap_schedule_flag_is_unset_unless_given(tmp_path):
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    assert "--disable-overlap-schedule" in parser.format_help()
    given = ServerArgs.from_cli_namespace(parser.parse_args(["--disable-overlap-schedule"]))
    assert given.disable_overlap_schedule is True
    assert ServerArgs.from_cli_namespace(parser.parse_args([])).disable_overlap_schedule is None
    config = tmp_path / "overlap.yaml"
    config.write_text("disable_overlap_schedule: false\n")          # forces overlap on (the CPU too)
    forced = ServerArgs.from_cli_namespace(parser.parse_args(["--config", str(config)]))
    assert forced.disable_overlap_schedule is False


# -- attention "auto" on the CPU by timing ----------------------------------------------------
CPU = ("torch_native", "flex_attention")


def shapes(heads: int = 4, kv_heads: int = 2, head_dim: int = 16) -> AttentionConfig:
    return AttentionConfig(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, dtype=torch.float32,
                           device="cpu", page_size=1, max_context_len=512, max_batch_size=8)


@pytest.mark.parametrize("native, flex, expected", [
    ((2.0, 1.0), (9.0, 9.0), "torch_native"),
    ((9.0, 9.0), (2.0, 1.0), "flex_attention"),
    ((1.0, 1.0), (0.95, 0.95), "torch_native"),     # within the margin: the preferred one stays
    ((1.0, 1.0), (0.85, 0.85), "flex_attention"),
    ((1.0, 1.0), (0.1, None), "torch_native"),     # decode not timed: it lost on extend
])
def test_pick_by_timing_prefers_the_first_unless_another_is_clearly_faster(native, flex, expected):
    name, why = pick_by_timing(CPU, {"torch_native": AttentionTiming(*native),
                                     "flex_attention": AttentionTiming(*flex)})
    assert name == expected
    assert "torch_native extend" in why and "flex_attention extend" in why   # both timings


def test_a_failing_candidate_is_never_picked():
    name, why = pick_by_timing(CPU, {"torch_native": AttentionTiming(5.0, 5.0),
                                     "flex_attention": RuntimeError("no flex here")})
    assert name == "torch_native" and "flex_attention failed (RuntimeError: no flex here)" in why
    name, why = pick_by_timing(CPU, {"torch_native": ValueError("x"), "flex_attention": ValueError("y")})
    assert name == "torch_native" and "none ran" in why


def test_auto_on_cpu_times_once_per_shape_and_logs_why(monkeypatch, caplog, tmp_path):
    import kvyard.attention.timing as timing

    calls = []

    def fake_time_backend(factory, config, give_up_s=float("inf"), **_):
        calls.append((factory.__name__, config.num_heads))
        if factory.__name__ == "FlexAttentionBackend":
            raise RuntimeError("flex broke")
        return AttentionTiming(0.003, 0.001)

    monkeypatch.setenv("KVYARD_CACHE_DIR", str(tmp_path))   # the choice is kept on disk
    monkeypatch.setattr(timing, "time_backend", fake_time_backend)
    backend_select._timings_per_shape.cache_clear()
    with caplog.at_level(logging.INFO, logger="kvyard.executor.backend_select"):
        assert resolve_attention_backend("auto", "cpu", shapes()) == "torch_native"
        assert resolve_attention_backend("auto", "cpu", shapes()) == "torch_native"    # cached
        assert resolve_attention_backends("auto", None, None, "cpu", shapes(heads=8)) == ("torch_native",) * 2
    assert calls == [("TorchNativeBackend", 4), ("FlexAttentionBackend", 4),
                     ("TorchNativeBackend", 8), ("FlexAttentionBackend", 8)]
    assert "timed on the model's head shapes" in caplog.text and "flex broke" in caplog.text
    assert resolve_attention_backend("auto", "cpu") == "torch_native"   # no shapes: no timing
    assert len(calls) == 4
    backend_select._timings_per_shape.cache_clear()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kvyard.executor.backend_select"):   # a later start
        assert resolve_attention_backend("auto", "cpu", shapes()) == "torch_native"
    assert len(calls) == 4 and "timed earlier on this machine" in caplog.text


def test_time_backend_runs_both_cpu_backends_on_small_shapes():
    from kvyard.attention.timing import time_backend
    from kvyard.plugins import registry

    for name in CPU:
        timing = time_backend(registry("attention_backends").get(name), shapes(), repeats=1)
        assert 0 < timing.extend_s < float("inf") and 0 < timing.decode_s < float("inf")
    lost = time_backend(registry("attention_backends").get("torch_native"), shapes(), repeats=1, give_up_s=0.0)
    assert lost.decode_s is None and lost.total_s == float("inf")
