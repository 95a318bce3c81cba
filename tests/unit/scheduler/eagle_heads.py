"""Tiny EAGLE / EAGLE-3 head checkpoints for tests, written in the published layouts (config.json
+ safetensors with the names SGLang and vLLM load).

``echo=True`` builds a head whose output reproduces the target's own prediction at the position
it reads (its attention and MLP outputs are zero, its fc passes the target's state through; an
EAGLE-3 echo head copies the target's final norm and LM head rows): it drafts the last token again
and again, which a repetitive tiny target accepts often. Otherwise the weights are random.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file


TINY = dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=96)


def _llama_config(target, shape: dict, **extra) -> dict:
    cfg = target.config
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.hidden_size,
            **shape, "num_hidden_layers": 1,
            "rms_norm_eps": 1e-6, "vocab_size": cfg.vocab_size, "max_position_embeddings": 512,
            "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float32", **extra}


def _layer(prefix: str, h: int, attn_in: int, g: torch.Generator, echo: bool, shape: dict,
           first_norm: bool = True) -> dict:
    head_dim = h // shape["num_attention_heads"]
    q, kv = h, shape["num_key_value_heads"] * head_dim
    inter = shape["intermediate_size"]

    def rnd(*size):
        return torch.randn(*size, generator=g) * 0.1

    out = {f"{prefix}.self_attn.q_proj.weight": rnd(q, attn_in), f"{prefix}.self_attn.k_proj.weight": rnd(kv, attn_in),
           f"{prefix}.self_attn.v_proj.weight": rnd(kv, attn_in), f"{prefix}.self_attn.o_proj.weight": rnd(h, q),
           f"{prefix}.mlp.gate_proj.weight": rnd(inter, h), f"{prefix}.mlp.up_proj.weight": rnd(inter, h),
           f"{prefix}.mlp.down_proj.weight": rnd(h, inter),
           f"{prefix}.post_attention_layernorm.weight": 1 + rnd(h)}
    if first_norm:
        out[f"{prefix}.input_layernorm.weight"] = 1 + rnd(h)
    if echo:
        out[f"{prefix}.self_attn.o_proj.weight"].zero_()
        out[f"{prefix}.mlp.down_proj.weight"].zero_()
    return out


def save_eagle_head(path, target, echo: bool = False, seed: int = 0) -> str:
    """An EAGLE head for ``target`` (a transformers Llama-family model): one layer, fc with bias."""
    g = torch.Generator().manual_seed(seed)
    h = target.config.hidden_size
    tensors = _layer("model.layers.0", h, h, g, echo, TINY, first_norm=False)
    tensors["model.fc.weight"] = torch.randn(h, 2 * h, generator=g) * 0.1
    tensors["model.fc.bias"] = torch.randn(h, generator=g) * 0.1
    tensors["model.embed_tokens.weight"] = torch.randn(target.config.vocab_size, h, generator=g)   # ignored
    if echo:   # fc(concat(embed, hidden)) = hidden
        tensors["model.fc.weight"] = torch.cat([torch.zeros(h, h), torch.eye(h)], dim=1)
        tensors["model.fc.bias"].zero_()
    return _save(path, _llama_config(target, TINY), tensors)


def save_eagle3_head(path, target, echo: bool = False, seed: int = 0, draft_vocab: int = 64,
                     layers=(0, 1, 1), shape: dict = TINY) -> str:
    """An EAGLE-3 head for ``target``: fc over three target layers, its own norm and LM head over a
    draft vocabulary of ``draft_vocab`` target ids (every 4th id, then the rest) with d2t.
    ``shape``: the head's attention heads, KV heads and MLP width."""
    g = torch.Generator().manual_seed(seed)
    cfg, h = target.config, target.config.hidden_size
    vocab = cfg.vocab_size
    tensors = _layer("midlayer", h, 2 * h, g, echo, shape)
    tensors["midlayer.hidden_norm.weight"] = 1 + torch.randn(h, generator=g) * 0.1
    tensors["fc.weight"] = torch.randn(h, 3 * h, generator=g) * 0.1
    tensors["norm.weight"] = 1 + torch.randn(h, generator=g) * 0.1
    order = list(range(0, vocab, 4)) + [i for i in range(vocab) if i % 4]
    ids = torch.tensor(order[:draft_vocab], dtype=torch.int64)
    tensors["lm_head.weight"] = torch.randn(draft_vocab, h, generator=g) * 0.3
    if echo:   # the last layer's output through the target's final norm and LM head rows
        tensors["fc.weight"] = torch.cat([torch.zeros(h, 2 * h), torch.eye(h)], dim=1)
        tensors["norm.weight"] = target.model.norm.weight.detach().clone()
        tensors["lm_head.weight"] = target.lm_head.weight.detach()[ids].clone()
    tensors["d2t"] = ids - torch.arange(draft_vocab)
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[ids] = True
    tensors["t2d"] = t2d
    config = _llama_config(target, shape, architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=draft_vocab,
                           target_hidden_size=h,
                           eagle_config={"eagle_aux_hidden_state_layer_ids": list(layers), "use_aux_hidden_state": True})
    return _save(path, config, tensors)


def _save(path, config: dict, tensors: dict) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"))
    return str(path)


def save_exact_head(tmp_path) -> tuple[str, str]:
    """(target folder, EAGLE head folder): a one-layer target whose attention adds nothing
    predicts from the current token alone; the head (fc passes the embedding, the target layer's
    MLP) computes the target's next prediction exactly (up to the final norm's positive scale,
    which greedy ignores)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, tie_word_embeddings=False)
    target = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        target.model.layers[0].self_attn.o_proj.weight.zero_()
    target.save_pretrained(tmp_path / "target")
    head = save_eagle_head(tmp_path / "head", target)
    tensors = load_file(os.path.join(head, "model.safetensors"))
    h = cfg.hidden_size
    tensors["model.fc.weight"] = torch.cat([torch.eye(h), torch.zeros(h, h)], dim=1)   # the embedding only
    tensors["model.fc.bias"].zero_()
    tensors["model.layers.0.self_attn.o_proj.weight"].zero_()
    layer = target.model.layers[0]
    for name in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "post_attention_layernorm"):
        tensors[f"model.layers.0.{name}.weight"] = layer.get_submodule(name).weight.detach().clone()
    save_file(tensors, os.path.join(head, "model.safetensors"))
    return str(tmp_path / "target"), head
