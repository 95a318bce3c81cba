"""A causal LM served as an embedding model (--is-embedding): last-token pooling.

``LastTokenPooling`` wraps a generation model so the runner treats it like any embedding model
(``is_generation = False``, ``pool(hidden, fb)``): the vector of a request is the final-norm
hidden state of its last prompt token, L2-normalized ([B, hidden], float32). Embedding requests
are never chunked nor prefix-matched, so each request's whole prompt is in the extend batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LastTokenPooling(nn.Module):
    is_generation = False

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, fb) -> torch.Tensor:
        return self.model(input_ids, positions, fb)

    def pool(self, hidden: torch.Tensor, fb) -> torch.Tensor:
        """hidden [T, H] of an extend batch -> [B, H]: each request's last row, normalized."""
        ends = torch.tensor(fb.extend_seq_lens_cpu, device=hidden.device).cumsum(0) - 1
        return F.normalize(hidden[ends].float(), dim=-1)
