"""VocabEmbedding: token ids -> dense rows. Always stored dense (quantized checkpoints are
dequantized on load): a lookup reads a handful of rows, so keeping it packed buys nothing."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kvyard.layers.weights import copy_checked


class VocabEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", prefix: str = ""):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.prefix = prefix
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, dtype=dtype, device=device),
                                   requires_grad=False)

    def load(self, weight: Any, name: str = "") -> None:
        """weight [vocab, hidden]: a tensor or a QuantizedTensor."""
        copy_checked(self.weight, weight, name or f"{self.prefix}.weight")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] -> [T, hidden]."""
        return F.embedding(input_ids, self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"
