"""LogitsHead: hidden states of the rows that need logits -> float32 logits.

The projection is a ``Linear`` (prefix "lm_head"), so a quantization method may keep it packed;
with tied word embeddings the model loads the embedding tensor into it too. Under tensor
parallelism the lm_head is column-parallel over the (padded) vocabulary: each rank's logits
[N, V'] are all-gathered into [N, padded vocab] before the padding is cut, so every rank samples
from the same full logits.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from kvyard.distributed.collectives import all_gather_last
from kvyard.layers.linear import Linear


class LogitsHead(nn.Module):
    def __init__(self, lm_head: Linear, vocab_size: Optional[int] = None, scale: float = 1.0,
                 soft_cap: Optional[float] = None):
        """``vocab_size`` < lm_head.out_features drops padded vocabulary rows; ``scale``
        multiplies the logits and ``soft_cap`` applies cap * tanh(logits / cap) (Gemma-style)."""
        super().__init__()
        full = sum(lm_head.full_output_sizes)
        if vocab_size is not None and not 0 < vocab_size <= full:
            raise ValueError(f"vocab_size must be in (0, {full}], got {vocab_size}")
        if soft_cap is not None and soft_cap <= 0:
            raise ValueError(f"soft_cap must be positive, got {soft_cap}")
        self.lm_head = lm_head
        self.vocab_size = vocab_size or full
        self.scale = scale
        self.soft_cap = soft_cap

    def forward(self, hidden: torch.Tensor, project: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] float32. ``project`` stands in for the
        lm_head's own forward (a lowered decode step's call of the same weights)."""
        logits = (project or self.lm_head)(hidden)
        if self.lm_head.out_shards is not None:
            logits = all_gather_last(logits, self.lm_head.tp)
        if self.vocab_size != logits.shape[-1]:
            logits = logits[..., :self.vocab_size]
        logits = logits.float()
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.soft_cap is not None:
            logits = torch.tanh(logits / self.soft_cap) * self.soft_cap
        return logits
