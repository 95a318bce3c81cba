"""QuantizationMethod: how linear layers store and multiply their weights.

A model builds every projection as ``kvyard.layers.linear.Linear``; the layer asks its
LinearMethod to create, load and apply the weight, so kept-quantized weights (GGUF, int8, fp8)
need no second model path. ``None`` (no --quantization) means UnquantizedLinearMethod.

Lifecycle of one linear layer:
  create_weights(layer)          once, at model construction (registers parameters/buffers)
  load_shard(layer, shard, w)    for each checkpoint tensor; shard indexes layer.output_sizes
  process_after_loading(layer)   once, after every shard is in (repacking, transposes)
  apply(layer, x) -> y           every forward; x [..., in_features] -> y [..., out_features]
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from kvyard.layers.linear import Linear


@dataclass(frozen=True)
class QuantizationConfig:
    name: str
    dtype: torch.dtype     # activation dtype
    device: str


class LinearMethod(ABC):
    @abstractmethod
    def create_weights(self, layer: "Linear") -> None: ...

    @abstractmethod
    def load_shard(self, layer: "Linear", shard: int, weight: Any) -> None: ...

    def process_after_loading(self, layer: "Linear") -> None:
        pass

    @abstractmethod
    def apply(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor: ...


class UnquantizedLinearMethod(LinearMethod):
    """Dense weight [sum(output_sizes), in_features] in the model dtype."""

    def __init__(self, dtype: torch.dtype, device: str | torch.device = "cpu"):
        self.dtype = dtype
        self.device = device

    def create_weights(self, layer: "Linear") -> None:
        layer.weight = torch.nn.Parameter(
            torch.empty(layer.out_features, layer.in_features, dtype=self.dtype, device=self.device),
            requires_grad=False)

    def load_shard(self, layer: "Linear", shard: int, weight: Any) -> None:
        weight = _dense(weight)
        start = sum(layer.output_sizes[:shard])
        rows = layer.output_sizes[shard]
        if tuple(weight.shape) != (rows, layer.in_features):
            raise ValueError(f"{layer.prefix}: checkpoint shape {tuple(weight.shape)} does not match "
                             f"({rows}, {layer.in_features})")
        layer.weight.data[start:start + rows].copy_(weight)

    def apply(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight, layer.bias)


def _dense(weight: Any) -> torch.Tensor:
    """Checkpoint tensors that know how to dequantize themselves expose ``dequantize()``."""
    if isinstance(weight, torch.Tensor):
        return weight
    if hasattr(weight, "dequantize"):
        return weight.dequantize()
    raise TypeError(f"cannot load a weight of type {type(weight).__name__}")


class QuantizationMethod(ABC):
    """A plugin kind: picks the LinearMethod for each linear layer of a model."""

    name: str = "base"

    def __init__(self, config: QuantizationConfig):
        self.config = config

    @abstractmethod
    def linear_method(self, prefix: str) -> LinearMethod:
        """The method for the linear layer named ``prefix`` (e.g. "model.layers.0.mlp.down_proj")."""
