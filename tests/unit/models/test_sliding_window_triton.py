"""The triton attention plugin (CPU interpreter) serves sliding-window and soft-capped layers:
tiny Gemma 2 (window 8 on alternating layers, attention and final soft-caps) and Qwen3 (window 8
on its second layer) equal to transformers' greedy output for prompts up to 44 tokens, as one
batch with chunked prefill (extend kernel: prefix + window) and decode (split-KV kernel)."""
import os

os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported anywhere in this process

import pytest

pytest.importorskip("triton")

import kvyard_plugins.attention.triton as triton_plugin  # noqa: E402
from hf_reference import assert_matches_reference, build_harness, plugin_manager  # noqa: E402
import kvyard_plugins.models.gemma as gemma_plugin  # noqa: E402
import kvyard_plugins.models.llama as llama_plugin  # noqa: E402
from test_dense_models_vs_hf import ATOL, PROMPTS, STEPS, reference  # noqa: E402


@pytest.mark.parametrize("name", ["gemma2", pytest.param("qwen3-window8-tied", marks=pytest.mark.slow)])
def test_sliding_window_and_soft_cap_on_triton(name):
    hf, expected = reference(name)
    pm = plugin_manager(llama_plugin, gemma_plugin, triton_plugin)
    harness = build_harness(hf, pm, "triton", page_size=4)
    assert_matches_reference(harness.generate(PROMPTS, STEPS, chunk_size=16), expected, ATOL)
