"""Building blocks of the EAGLE / EAGLE-3 draft heads: a Llama-style attention and MLP on the
core layers, the head's config, and reading a head checkpoint.

A head checkpoint is a folder with config.json (a Llama config; EAGLE-3 adds draft_vocab_size,
target_hidden_size, eagle_config) and its weights as *.safetensors or pytorch_model*.bin, the
names with or without a leading "model." (both layouts are published).
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from kvyard.forward_batch import ForwardBatch
from kvyard.kv_layout import KVLayout
from kvyard.layers.activation import SiluAndMul
from kvyard.layers.attention import Attention
from kvyard.layers.linear import Linear
from kvyard.layers.norm import RMSNorm
from kvyard.layers.rotary import RotaryEmbedding, rope_config_from_hf


@dataclass(frozen=True)
class HeadDims:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    num_layers: int

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def head_dims(cfg: Any) -> HeadDims:
    heads = cfg.num_attention_heads
    return HeadDims(hidden_size=cfg.hidden_size, num_heads=heads,
                    num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                    head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
                    intermediate_size=cfg.intermediate_size, rms_norm_eps=cfg.rms_norm_eps,
                    num_layers=cfg.num_hidden_layers)


def load_head_config(path: str) -> Any:
    """The head's config.json as a transformers config (model_type llama)."""
    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"speculative_draft_model_path: {path} has no config.json")
    return AutoConfig.from_pretrained(path)


def read_head_weights(path: str) -> dict[str, torch.Tensor]:
    """name -> tensor of every weight file in the folder, a leading "model." dropped."""
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    tensors: dict[str, torch.Tensor] = {}
    if files:
        from safetensors.torch import load_file
        for f in files:
            tensors.update(load_file(f))
    else:
        files = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
        for f in files:
            tensors.update(torch.load(f, map_location="cpu", weights_only=True))
    if not files:
        raise ValueError(f"speculative_draft_model_path: {path} has no *.safetensors or pytorch_model*.bin")
    return {name.removeprefix("model."): t for name, t in tensors.items()}


class WeightSource:
    """The checkpoint's tensors, taken by name; names never taken are reported as unused."""

    def __init__(self, tensors: dict[str, torch.Tensor], what: str):
        self.tensors = dict(tensors)
        self.what = what

    def has(self, name: str) -> bool:
        return name in self.tensors

    def take(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise ValueError(f"speculative_draft_model_path: the {self.what} checkpoint lacks {name}")
        return self.tensors.pop(name)

    def into(self, param: torch.Tensor, name: str) -> None:
        t = self.take(name)
        if tuple(t.shape) != tuple(param.shape):
            raise ValueError(f"speculative_draft_model_path: {name} has shape {tuple(t.shape)}, "
                             f"the {self.what} config gives {tuple(param.shape)}")
        param.data.copy_(t)

    def linear(self, linear: Linear, parts: list[str]) -> None:
        for shard, part in enumerate(parts):
            linear.load_shard(shard, self.take(f"{part}.weight"))
            if linear.bias is not None:
                linear.load_bias_shard(shard, self.take(f"{part}.bias"))


class HeadAttention(nn.Module):
    """q/k/v from ``in_features`` (EAGLE-3: the concatenated embedding and hidden state), rotary,
    attention over the head's KV (layer ``layer_id`` of its pool), o_proj back to hidden."""

    def __init__(self, dims: HeadDims, layer_id: int, in_features: int, dtype, device, bias: bool = False):
        super().__init__()
        self.dims = dims
        kw = dict(dtype=dtype, device=device)
        self.qkv_proj = Linear(in_features, [dims.q_size, dims.kv_size, dims.kv_size], bias=bias,
                               prefix=f"head.layers.{layer_id}.qkv_proj", **kw)
        self.o_proj = Linear(dims.q_size, dims.hidden_size, prefix=f"head.layers.{layer_id}.o_proj", **kw)
        self.attn = Attention(layer_id, dims.num_heads, dims.num_kv_heads, dims.head_dim)

    def forward(self, x: torch.Tensor, cos_sin, fb: ForwardBatch) -> torch.Tensor:
        d, t = self.dims, x.shape[0]
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        q = RotaryEmbedding.apply(q.reshape(t, d.num_heads, d.head_dim), cos_sin).reshape(t, -1)
        k = RotaryEmbedding.apply(k.reshape(t, d.num_kv_heads, d.head_dim), cos_sin).reshape(t, -1)
        return self.o_proj(self.attn(q, k, v.contiguous(), fb))

    def load(self, src: WeightSource, prefix: str) -> None:
        src.linear(self.qkv_proj, [f"{prefix}.q_proj", f"{prefix}.k_proj", f"{prefix}.v_proj"])
        src.linear(self.o_proj, [f"{prefix}.o_proj"])


class HeadMLP(nn.Module):
    def __init__(self, dims: HeadDims, dtype, device):
        super().__init__()
        inter = dims.intermediate_size
        self.gate_up_proj = Linear(dims.hidden_size, [inter, inter], prefix="head.mlp.gate_up_proj",
                                   dtype=dtype, device=device)
        self.down_proj = Linear(inter, dims.hidden_size, prefix="head.mlp.down_proj", dtype=dtype, device=device)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))

    def load(self, src: WeightSource, prefix: str) -> None:
        src.linear(self.gate_up_proj, [f"{prefix}.gate_proj", f"{prefix}.up_proj"])
        src.linear(self.down_proj, [f"{prefix}.down_proj"])


def rotary_for(cfg: Any, dims: HeadDims, dtype, device) -> RotaryEmbedding:
    return RotaryEmbedding(rope_config_from_hf(cfg, dims.head_dim), dtype, device)


def head_kv_layout(dims: HeadDims, num_layers: Optional[int] = None) -> KVLayout:
    return KVLayout.mha(num_layers or dims.num_layers, dims.num_kv_heads, dims.head_dim)


def norm(dims: HeadDims, dtype, device) -> RMSNorm:
    return RMSNorm(dims.hidden_size, dims.rms_norm_eps, dtype, device)
