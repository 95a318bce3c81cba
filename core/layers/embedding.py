"""VocabEmbedding: token ids -> dense rows. Always stored dense (quantized checkpoints are
dequantized on load): a lookup reads a handful of rows, so keeping it packed buys nothing.

Tensor parallelism (``tp``): vocabulary-parallel. The vocabulary is padded up to a multiple of
the ranks; rank r holds rows [r * V', (r + 1) * V') (V' = padded vocab / ranks; padded rows are
zero). A lookup embeds the ids this rank holds, zeros the others and all-reduces: every rank
ends with the full [T, hidden].
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kvyard.distributed import SINGLE, TensorParallel
from kvyard.distributed.collectives import all_reduce
from kvyard.distributed.shard import take
from kvyard.layers.weights import copy_checked


class VocabEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", prefix: str = "", tp: TensorParallel = SINGLE):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.prefix = prefix
        self.tp = tp
        self.shard = tp.split_padded(num_embeddings)
        self.weight = nn.Parameter(torch.empty(self.shard.size, embedding_dim, dtype=dtype, device=device),
                                   requires_grad=False)

    def load(self, weight: Any, name: str = "") -> None:
        """weight [vocab, hidden]: a tensor or a QuantizedTensor (this rank's rows are kept)."""
        name = name or f"{self.prefix}.weight"
        copy_checked(self.weight, take(weight, 0, self.shard, name), name)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] -> [T, hidden]."""
        if not self.tp.enabled:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.shard.start
        outside = (local < 0) | (local >= self.shard.size)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return all_reduce(out.masked_fill_(outside[:, None], 0.0), self.tp)

    def extra_repr(self) -> str:
        rows = f", rows {self.shard.start}..{self.shard.start + self.shard.size}" if self.tp.enabled else ""
        return f"{self.num_embeddings}, {self.embedding_dim}{rows}"
