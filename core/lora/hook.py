"""LoRAHook: what a LoRA target's ``Linear.lora_hook`` runs after the base matmul.

The hooks of one model share a LoRARuntime whose ``batch`` the ModelRunner binds at the start of
every forward (``ForwardBatch.lora``); nothing else reaches the layers, and an unbound runtime
(or a batch of base-model requests only) adds nothing.
"""
from __future__ import annotations

from typing import Optional

import torch

from kvyard.lora.batch import LoRABatchInfo
from kvyard.lora.ops import BACKENDS


class LoRARuntime:
    def __init__(self, backend: str):
        self.apply = BACKENDS[backend]
        self.batch: Optional[LoRABatchInfo] = None

    def bind(self, info: Optional[LoRABatchInfo]) -> None:
        self.batch = info


class LoRAHook:
    def __init__(self, runtime: LoRARuntime, a: torch.Tensor, b: torch.Tensor, shard_sizes: list[int]):
        self.runtime = runtime
        self.a, self.b = a, b                  # the slot pool's buffers of this layer
        self.shard_sizes = list(shard_sizes)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        info = self.runtime.batch
        if info is None or not info.any_lora:
            return y
        shape = y.shape
        x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        return self.runtime.apply(x2, y2, self.a, self.b, self.shard_sizes, info).view(shape)
