"""Pooling: the hidden states of a prompt -> one vector per request (embedding models).

``PoolingConfig`` says how: "last" (the last token; decoder embedders such as Qwen3-Embedding),
"mean" (mean over the prompt's tokens; BERT sentence embedders) or "cls" (the first token), then
optionally an L2 normalisation. ``pooling_config_from_folder`` reads it from a model folder's
sentence-transformers files (modules.json; the Pooling module's config.json, e.g.
1_Pooling/config.json; a Normalize module), as sentence-transformers itself would; a module it
cannot reproduce (Dense projections, max or weighted pooling) is a clear "not supported" error.

``EmbeddingAdapter`` serves a generation model as an embedding model (``--is-embedding``): the
model's forward gives the hidden states after its final norm, the adapter pools them.

Invariant: an embedding batch holds whole prompts (the scheduler neither chunks nor
prefix-matches embedding requests), so ``fb.extend_seq_lens_cpu`` splits ``hidden`` [T, H]
into exactly the prompts' tokens.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kvyard.forward_batch import ForwardBatch

METHODS = ("last", "mean", "cls")
_MODES = {"pooling_mode_lasttoken": "last", "pooling_mode_mean_tokens": "mean",
          "pooling_mode_cls_token": "cls"}
_UNSUPPORTED_MODES = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                      "pooling_mode_weightedmean_tokens")
_ST = "sentence_transformers.models."


@dataclass(frozen=True)
class PoolingConfig:
    method: str = "last"
    normalize: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"pooling method {self.method!r} is not supported; supported: {', '.join(METHODS)}")


def pooling_config_from_folder(model_path: str) -> Optional[PoolingConfig]:
    """The pooling a sentence-transformers model folder declares, or None without modules.json."""
    folder = Path(model_path) if Path(model_path).is_dir() else Path(model_path).parent
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return None
    modules = json.loads(modules_file.read_text())
    kinds = [m.get("type", "").removeprefix(_ST) for m in modules]
    extra = sorted(set(kinds) - {"Transformer", "Pooling", "Normalize"})
    if extra:
        raise ValueError(f"{modules_file}: sentence-transformers module {extra[0]} is not supported yet")
    method = "cls" if "Pooling" not in kinds else None
    for module in modules:
        if module.get("type", "").removeprefix(_ST) == "Pooling":
            method = _pooling_method(folder / module.get("path", "") / "config.json")
    return PoolingConfig(method=method, normalize="Normalize" in kinds)


def _pooling_method(config_file: Path) -> str:
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    for key in _UNSUPPORTED_MODES:
        if config.get(key):
            raise ValueError(f"{config_file}: {key} is not supported yet")
    if config.get("include_prompt") is False:
        raise ValueError(f"{config_file}: include_prompt=false is not supported yet")
    chosen = [method for key, method in _MODES.items() if config.get(key)]
    if len(chosen) != 1:
        raise ValueError(f"{config_file}: exactly one of {', '.join(_MODES)} must be true, got {len(chosen)}")
    return chosen[0]


def pool(hidden: torch.Tensor, fb: ForwardBatch, config: PoolingConfig) -> torch.Tensor:
    """hidden [T, H] of whole prompts -> [B, H] float32."""
    chunks = hidden.split(fb.extend_seq_lens_cpu)
    if config.method == "mean":
        pooled = torch.stack([c.float().mean(0) for c in chunks])
    else:
        row = -1 if config.method == "last" else 0
        pooled = torch.stack([c[row] for c in chunks]).float()
    return F.normalize(pooled, dim=-1) if config.normalize else pooled


class EmbeddingAdapter(nn.Module):
    """A generation model served as an embedding model: same forward, pooled outputs."""

    is_generation = False

    def __init__(self, model: nn.Module, pooling: PoolingConfig):
        super().__init__()
        self.model = model
        self.pooling = pooling

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        return self.model(input_ids, positions, fb)

    def pool(self, hidden: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        return pool(hidden, fb, self.pooling)

    def load_weights(self, weights: Any) -> None:
        self.model.load_weights(weights)
