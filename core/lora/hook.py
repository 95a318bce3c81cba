"""LoRAHook: what a LoRA target's Linear runs for its adapters' term.

Two forms, fixed per layer when the manager attaches the hook:
  unfused  ``hook(x, y)`` after the LinearMethod's matmul (any quantization): shrink + expand.
  fused    ``hook.forward_fused(layer, x)`` instead of that matmul, for a method that carries
           extra weight rows (``LinearMethod.extend_rows``: unquantized weights): the pool's A
           buffer of this layer IS the trailing S n R rows of the weight, so ONE GEMM gives
           y_ext [T, out + S n R]; y = y_ext[:, :out] (a row-strided view, returned as is) and
           h = y_ext[:, out:] = x @ A_all.T, which the expand reads by slot.
The hooks of one model share a LoRARuntime whose ``batch`` the ModelRunner binds at the start of
every forward (``ForwardBatch.lora``); nothing else reaches the layers, and an unbound runtime
(or a batch of base-model requests only) adds nothing — the fused form then multiplies the base
rows only.
"""
from __future__ import annotations

from typing import Optional

import torch

from kvyard.lora.batch import LoRABatchInfo
from kvyard.lora.ops import BACKENDS


class LoRARuntime:
    def __init__(self, backend: str):
        self.ops = BACKENDS[backend]
        self.batch: Optional[LoRABatchInfo] = None

    def bind(self, info: Optional[LoRABatchInfo]) -> None:
        self.batch = info


class LoRAHook:
    def __init__(self, runtime: LoRARuntime, a: torch.Tensor, b: torch.Tensor, shard_sizes: list[int],
                 fused: bool = False):
        self.runtime = runtime
        self.a, self.b = a, b                  # the slot pool's buffers of this layer
        self.shard_sizes = list(shard_sizes)
        self.fused = fused                     # a is the layer's extra weight rows

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        info = self.runtime.batch
        if info is None or not info.any_lora:
            return y
        shape = y.shape
        x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        return self.runtime.ops.apply(x2, y2, self.a, self.b, self.shard_sizes, info).view(shape)

    def forward_fused(self, layer, x: torch.Tensor) -> torch.Tensor:
        """``layer``'s output with the adapters' term, from one GEMM over W_ext (see above)."""
        info = self.runtime.batch
        if info is None or not info.any_lora:
            return layer.method.apply(layer, x)
        out = layer.out_features
        y_ext = layer.method.apply_extended(layer, x)
        y_ext2 = y_ext.view(-1, y_ext.shape[-1])                # [T, out + S n R], contiguous
        y2 = y_ext2[:, :out]                                    # row stride out + S n R
        self.runtime.ops.expand(y_ext2[:, out:], y2, self.b, self.shard_sizes, info)
        return y2 if y_ext.dim() == 2 else y2.view(*y_ext.shape[:-1], out)
