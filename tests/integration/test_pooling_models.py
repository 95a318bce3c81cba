"""Pooling models through the Engine against transformers (float32, CPU), 8 inputs each:

* decoders served with --is-embedding: last-token or mean pooling and normalisation as the
  folder's sentence-transformers files say (modules.json, 1_Pooling/config.json), last token +
  L2 norm without them; compared with the HF base model's last hidden states pooled the same way;
* reward / classification heads (LlamaForSequenceClassification, Qwen2ForSequenceClassification)
  through Engine.encode: the scores equal HF's logits.
Cosine similarity >= 0.99999 per input, and elementwise within 1e-4.
"""
from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
import transformers

from kvyard import Engine

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, pad_token_id=0)
_rng = random.Random(7)
INPUTS = [[_rng.randrange(1, 256) for _ in range(n)] for n in (3, 9, 17, 33, 1, 24, 40, 12)]


def write_sentence_transformers_files(path, mode: str, normalize: bool) -> None:
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir()
    flags = {f"pooling_mode_{m}": m == mode for m in ("cls_token", "mean_tokens", "max_tokens", "lasttoken")}
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64, **flags}))


def save(tmp_path, name: str, arch: str, config_name: str, **extra):
    torch.manual_seed(0)
    hf = getattr(transformers, arch)(getattr(transformers, config_name)(**{**COMMON, **extra})).eval()
    path = tmp_path / name
    hf.save_pretrained(path)
    return path, hf


def hf_hidden(hf, ids: list[int]) -> torch.Tensor:
    base = hf.model if hasattr(hf, "model") else hf
    with torch.inference_mode():
        return base(torch.tensor([ids])).last_hidden_state[0]


def encode(path, **kwargs) -> torch.Tensor:
    with Engine(model_path=str(path), dtype="float32", skip_tokenizer_init=True, max_total_tokens=2048,
                log_level="warning", **kwargs) as engine:
        return torch.tensor([o["embedding"] for o in engine.encode(input_ids=INPUTS)])


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    cosine = F.cosine_similarity(got.double(), want.double(), dim=-1)
    assert (cosine >= 0.99999).all(), cosine
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("case", ["qwen3-last-normalized"] + [pytest.param(c, marks=pytest.mark.slow)
                                                                for c in ("qwen2-mean", "qwen2-default")])
def test_decoder_embeddings_equal_transformers(tmp_path, case):
    arch, mode, normalize = {
        "qwen3-last-normalized": ("Qwen3", "lasttoken", True),
        "qwen2-mean": ("Qwen2", "mean_tokens", False),
        "qwen2-default": ("Qwen2", None, True),
    }[case]
    path, hf = save(tmp_path, case, f"{arch}ForCausalLM", f"{arch}Config")
    if mode is not None:
        write_sentence_transformers_files(path, mode, normalize)
    want = []
    for ids in INPUTS:
        hidden = hf_hidden(hf, ids)
        pooled = hidden.mean(0) if mode == "mean_tokens" else hidden[-1]
        want.append(F.normalize(pooled, dim=-1) if normalize else pooled)
    assert_same(encode(path, is_embedding=True), torch.stack(want))


@pytest.mark.parametrize("arch,labels", [("Llama", 3), pytest.param("Qwen2", 1, marks=pytest.mark.slow)])
def test_sequence_classification_scores_equal_transformers(tmp_path, arch, labels):
    path, hf = save(tmp_path, arch, f"{arch}ForSequenceClassification", f"{arch}Config", num_labels=labels)
    with torch.inference_mode():
        want = torch.cat([hf(torch.tensor([ids])).logits for ids in INPUTS])
    assert_same(encode(path), want)


def test_xlm_roberta_cross_encoder_scores_equal_transformers(tmp_path):
    """Positions start at padding_idx + 1 (XLM-RoBERTa's); the <s> token through the
    classification head."""
    path, hf = save(tmp_path, "xlmr", "XLMRobertaForSequenceClassification", "XLMRobertaConfig",
                    num_labels=1, type_vocab_size=1, layer_norm_eps=1e-5, **{"pad_token_id": 1})
    # <s> ids </s>, with no padding id (1) inside: HF numbers positions of non-pad tokens only
    inputs = [[0] + [max(3, t) for t in ids] + [2] for ids in INPUTS]
    with torch.inference_mode():
        want = torch.cat([hf(torch.tensor([ids])).logits for ids in inputs])
    with Engine(model_path=str(path), dtype="float32", skip_tokenizer_init=True, max_total_tokens=2048,
                log_level="warning") as engine:
        got = torch.tensor([o["embedding"] for o in engine.encode(input_ids=inputs)])
    assert_same(got, want)
