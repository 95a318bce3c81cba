"""The Triton paths of the MoE models under the CPU interpreter (TRITON_INTERPRET=1).

fused_experts (kvyard.kernels.triton_ops.fused_moe: tokens sorted by expert, block-aligned grouped
GEMMs) against the torch path and a per-token reference; align_by_expert's invariants; then
tiny models end to end: an MoE model with the fused-experts kernel forced, and DeepSeek with
the kernel plus the triton attention backend serving the "mla" KV layout, greedy tokens equal
to transformers.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported anywhere in this process

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from kvyard.kernels import force_triton
from kvyard.layers.moe import RoutingConfig, fused_experts_torch, select_experts
from kvyard.kernels.triton_ops.fused_moe import BLOCK_M, align_by_expert, fused_experts


def reference_experts(x, w13, w2, weights, ids):
    """Token by token, choice by choice: the definition."""
    inter = w2.shape[2]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gate_up = w13[e] @ x[t]
            out[t] += weights[t, j] * (w2[e] @ (F.silu(gate_up[:inter]) * gate_up[inter:]))
    return out


@pytest.mark.parametrize("tokens,hidden,inter,experts,top_k", [(1, 32, 16, 4, 2), (19, 48, 40, 8, 3),
                                                               (33, 16, 24, 3, 1)])
def test_fused_experts_match_the_definition(tokens, hidden, inter, experts, top_k):
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=gen)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen) * 0.2
    w2 = torch.randn(experts, hidden, inter, generator=gen) * 0.2
    weights, ids = select_experts(torch.randn(tokens, experts, generator=gen),
                                  RoutingConfig(experts, top_k, renormalize=True))
    want = reference_experts(x, w13, w2, weights, ids)
    torch.testing.assert_close(fused_experts_torch(x, w13, w2, weights, ids), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(fused_experts(x, w13, w2, weights, ids), want, rtol=0, atol=1e-5)


def test_align_by_expert_blocks_hold_one_expert_each():
    ids = torch.tensor([[2, 0], [2, 1], [0, 2], [2, 3]])
    sorted_ids, block_expert, num_padded = align_by_expert(ids, 5)
    n = ids.numel()
    used = sorted_ids[:int(num_padded)]
    assert sorted(used[used < n].tolist()) == list(range(n))       # every choice exactly once
    assert (sorted_ids[int(num_padded):] == n).all()                # padding past the end
    flat = ids.reshape(-1)
    for block in range(int(num_padded) // BLOCK_M):
        rows = used[block * BLOCK_M:(block + 1) * BLOCK_M]
        rows = rows[rows < n].long()
        assert (flat[rows] == int(block_expert[block])).all()
    assert (block_expert[int(num_padded) // BLOCK_M:] == 5).all()   # blocks past the end: no expert


def test_no_tokens_gives_an_empty_result():
    x = torch.zeros(0, 16)
    out = fused_experts(x, torch.zeros(2, 8, 16), torch.zeros(2, 16, 4), torch.zeros(0, 1),
                        torch.zeros(0, 1, dtype=torch.int64))
    assert out.shape == (0, 16)


# -- tiny models end to end --------------------------------------------------------------------
@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("moe-triton"))


PROMPT_STEPS = 8


def _greedy_on(name: str, root: str, backend: str):
    from test_moe_vs_hf import PROMPTS, build, reference

    _, _, expected = reference(name, root)
    with force_triton(["fused_moe"]):
        generation = build(name, root, backend=backend).generate(PROMPTS, PROMPT_STEPS, chunk_size=16)
    for i, (tokens, _) in enumerate(expected):
        assert generation.tokens[i] == tokens[:PROMPT_STEPS], f"prompt {i}"


def test_qwen2_moe_with_the_fused_experts_kernel(root):
    _greedy_on("qwen2-moe", root, "torch_native")


def test_deepseek_v3_on_triton_attention_and_kernel(root):
    _greedy_on("deepseek-v3", root, "triton")


@pytest.mark.slow
def test_deepseek_v2_on_triton_attention_and_kernel(root):
    _greedy_on("deepseek-v2", root, "triton")
