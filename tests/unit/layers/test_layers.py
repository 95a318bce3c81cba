"""The shared model layers against their transformers counterparts (float32, tiny shapes)."""
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (LlamaRMSNorm, LlamaRotaryEmbedding,
                                                      apply_rotary_pos_emb)

from kvyard.layers.activation import GeluAndMul, SiluAndMul
from kvyard.layers.embedding import VocabEmbedding
from kvyard.layers.linear import Linear
from kvyard.layers.logits import LogitsHead
from kvyard.layers.norm import RMSNorm
from kvyard.layers.rotary import RopeConfig, RotaryEmbedding, rope_config_from_hf
from kvyard.loader import QuantizedTensor


# -- RMSNorm ------------------------------------------------------------------------------------
def test_rmsnorm_matches_hf_and_fuses_the_residual_add():
    torch.manual_seed(0)
    ours, ref = RMSNorm(32, eps=1e-5), LlamaRMSNorm(32, eps=1e-5)
    weight = torch.randn(32)
    ours.weight.data.copy_(weight)
    ref.weight.data.copy_(weight)
    x, residual = torch.randn(5, 32), torch.randn(5, 32)

    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
    normed, summed = ours(x, residual)
    torch.testing.assert_close(summed, x + residual, rtol=0, atol=0)
    torch.testing.assert_close(normed, ref(x + residual), rtol=0, atol=0)


def test_rmsnorm_keeps_the_activation_dtype_and_computes_in_float32():
    torch.manual_seed(0)
    x = (torch.randn(3, 16) * 300).to(torch.bfloat16)   # squares overflow-prone in low precision
    out = RMSNorm(16, dtype=torch.bfloat16)(x)
    assert out.dtype == torch.bfloat16
    expected = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)


# -- rotary -------------------------------------------------------------------------------------
ROPE_CASES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
}


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_rotary_matches_hf(case):
    config = LlamaConfig(hidden_size=64, num_attention_heads=2, max_position_embeddings=256,
                         rope_theta=5000.0, rope_scaling=ROPE_CASES[case])
    head_dim = 32
    rotary = RotaryEmbedding(rope_config_from_hf(config, head_dim))
    assert rotary.cfg.rope_type == case and rotary.cfg.theta == 5000.0
    torch.manual_seed(0)
    positions = torch.tensor([0, 1, 7, 63, 64, 200, 255])
    q, k = torch.randn(7, 3, head_dim), torch.randn(7, 1, head_dim)

    cos, sin = LlamaRotaryEmbedding(config)(q, positions[None])
    q_ref, k_ref = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    cos_sin = rotary.lookup(positions)
    torch.testing.assert_close(rotary.apply(q, cos_sin), q_ref[0].transpose(0, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rotary.apply(k, cos_sin), k_ref[0].transpose(0, 1), rtol=1e-5, atol=1e-5)


def test_longrope_matches_hf_below_and_beyond_the_original_context():
    """Short factors below original_max_position_embeddings (HF on a sequence that fits it), long
    factors from there on (HF on a longer sequence), and HF's attention factor on cos/sin."""
    from transformers import Phi3Config
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    head_dim, original = 16, 64
    config = Phi3Config(hidden_size=64, num_attention_heads=4, max_position_embeddings=256,
                        original_max_position_embeddings=original, rope_scaling={
                            "rope_type": "longrope", "short_factor": [1.0 + i / 8 for i in range(8)],
                            "long_factor": [3.0 + i for i in range(8)]})
    rotary = RotaryEmbedding(rope_config_from_hf(config, head_dim))
    reference = Phi3RotaryEmbedding(config)
    x = torch.randn(1, 4, head_dim)
    for positions in (torch.arange(0, original), torch.arange(original, 256)):
        full = torch.arange(0, int(positions[-1]) + 1)      # HF picks the factors by sequence length
        cos, sin = reference(x, full[None])
        cos, sin = cos[0, positions], sin[0, positions]
        ours_cos, ours_sin = rotary.lookup(positions)
        torch.testing.assert_close(ours_cos[:, 0], cos, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours_sin[:, 0], sin, rtol=1e-5, atol=1e-5)


def test_rope_config_reads_legacy_attributes_and_extends_the_cache():
    legacy = SimpleNamespace(rope_theta=500000.0, max_position_embeddings=128,
                             rope_scaling={"type": "linear", "factor": 2.0})
    cfg = rope_config_from_hf(legacy, head_dim=16)
    assert (cfg.rope_type, cfg.theta, cfg.scaling["factor"]) == ("linear", 500000.0, 2.0)
    assert cfg.max_position == 256


def test_rope_rejects_unsupported_type_and_missing_keys():
    with pytest.raises(ValueError, match="rope_type 'mrope' is not supported"):
        RopeConfig(head_dim=16, max_position=8, rope_type="mrope")
    with pytest.raises(ValueError, match="low_freq_factor"):
        RotaryEmbedding(RopeConfig(head_dim=16, max_position=8, rope_type="llama3",
                                   scaling={"factor": 8.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8}))
    with pytest.raises(ValueError, match="head_dim"):
        RopeConfig(head_dim=15, max_position=8)


# -- activations --------------------------------------------------------------------------------
def test_gated_activations():
    torch.manual_seed(0)
    x = torch.randn(4, 2 * 24)
    gate, up = x[:, :24], x[:, 24:]
    torch.testing.assert_close(SiluAndMul()(x), F.silu(gate) * up)
    torch.testing.assert_close(GeluAndMul("tanh")(x), F.gelu(gate, approximate="tanh") * up)
    with pytest.raises(ValueError, match="approximate"):
        GeluAndMul("fast")


# -- embedding and logits -----------------------------------------------------------------------
def _q8_0(weight: torch.Tensor) -> QuantizedTensor:
    raw = gguf.quants.quantize(weight.numpy(), gguf.GGMLQuantizationType.Q8_0)
    return QuantizedTensor(torch.from_numpy(np.ascontiguousarray(raw)), tuple(weight.shape),
                           int(gguf.GGMLQuantizationType.Q8_0))


def test_embedding_loads_dense_and_quantized_tensors():
    torch.manual_seed(0)
    weight = torch.randn(10, 32)
    emb = VocabEmbedding(10, 32, prefix="model.embed_tokens")
    emb.load(weight)
    torch.testing.assert_close(emb(torch.tensor([3, 0, 9])), weight[[3, 0, 9]])

    emb.load(_q8_0(weight))
    torch.testing.assert_close(emb.weight.data, weight, rtol=0, atol=0.05)
    with pytest.raises(ValueError, match=r"model.embed_tokens.weight: checkpoint shape \(10, 16\)"):
        emb.load(torch.zeros(10, 16))


def test_logits_head_is_float32_and_applies_vocab_cut_and_soft_cap():
    torch.manual_seed(0)
    weight = torch.randn(12, 8)
    lm_head = Linear(8, 12, dtype=torch.bfloat16, prefix="lm_head")
    lm_head.load_shard(0, weight)
    hidden = torch.randn(3, 8, dtype=torch.bfloat16)
    expected = F.linear(hidden, weight.to(torch.bfloat16)).float()

    logits = LogitsHead(lm_head)(hidden)
    assert logits.dtype == torch.float32 and logits.shape == (3, 12)
    torch.testing.assert_close(logits, expected)
    capped = LogitsHead(lm_head, vocab_size=10, soft_cap=2.0)(hidden)
    torch.testing.assert_close(capped, torch.tanh(expected[:, :10] / 2.0) * 2.0)
    with pytest.raises(ValueError, match="vocab_size"):
        LogitsHead(lm_head, vocab_size=13)


def test_linear_bias_shard_checks_shape():
    layer = Linear(4, [6, 2, 2], bias=True, prefix="qkv")
    layer.load_bias_shard(1, torch.tensor([1.0, 2.0]))
    assert layer.bias.tolist() == [0.0] * 6 + [1.0, 2.0] + [0.0, 0.0]
    with pytest.raises(ValueError, match=r"qkv: checkpoint bias shape \(3,\)"):
        layer.load_bias_shard(2, torch.zeros(3))
    with pytest.raises(ValueError, match="without one"):
        Linear(4, 4, prefix="o").load_bias_shard(0, torch.zeros(4))
