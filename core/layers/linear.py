"""Linear: one projection, or several fused along the output dim (qkv, gate_up).

``output_sizes`` lists the fused outputs in order, so a checkpoint's q_proj/k_proj/v_proj load
as shards 0/1/2 of one qkv layer. Storage and matmul belong to the LinearMethod (quantization.py).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from kvyard.quantization import LinearMethod, UnquantizedLinearMethod


class Linear(nn.Module):
    def __init__(self, in_features: int, output_sizes: int | Sequence[int], bias: bool = False,
                 method: Optional[LinearMethod] = None, prefix: str = "",
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        super().__init__()
        self.in_features = in_features
        self.output_sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
        self.out_features = sum(self.output_sizes)
        self.prefix = prefix
        self.method = method or UnquantizedLinearMethod(dtype, device)
        self.bias = (nn.Parameter(torch.zeros(self.out_features, dtype=dtype, device=device),
                                  requires_grad=False) if bias else None)
        self.method.create_weights(self)

    def load_shard(self, shard: int, weight: Any) -> None:
        self.method.load_shard(self, shard, weight)

    def load_bias_shard(self, shard: int, bias: Any) -> None:
        """bias [output_sizes[shard]]: a tensor or anything with ``dequantize()``."""
        if self.bias is None:
            raise ValueError(f"{self.prefix}: the checkpoint has a bias but the layer was built without one")
        bias = bias if isinstance(bias, torch.Tensor) else bias.dequantize()
        rows = self.output_sizes[shard]
        if tuple(bias.shape) != (rows,):
            raise ValueError(f"{self.prefix}: checkpoint bias shape {tuple(bias.shape)} does not match ({rows},)")
        start = sum(self.output_sizes[:shard])
        self.bias.data[start:start + rows].copy_(bias)

    def process_after_loading(self) -> None:
        self.method.process_after_loading(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)

    def split(self, y: torch.Tensor) -> list[torch.Tensor]:
        return list(y.split(self.output_sizes, dim=-1))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.output_sizes}, method={type(self.method).__name__}"


def process_linears_after_loading(model: nn.Module) -> None:
    """Every Linear of ``model`` finishes loading (repacking, scales): call once all weights are in."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.process_after_loading()
