"""torchao: each linear layer's float weight is handed to ``torchao.quantization.quantize_``
with the recipe of --torchao-config; torchao's tensor subclass then owns storage and matmul.

Recipes: int8wo (int8 weight-only), int8dq (int8 dynamic activations x int8 weights), int4wo-<g>
(int4 weight-only, group g), fp8wo (fp8 weight-only), fp8dq-per_tensor / fp8dq-per_row (fp8
dynamic activations, per-tensor or per-row scales). torchao is optional (pip install
torchao); which recipes run depends on the device and torchao's kernels: on the CPU int8wo,
int8dq and fp8wo run, int4wo needs torchao's mslk kernels and fp8dq a CUDA device of compute
capability 8.9+ (torchao's own checks; the error names the recipe).
"""
from __future__ import annotations

import torch
from torch import nn

from kvyard.layers.quantized_linear import ShardedLinearMethod, _flat, _unflat
from kvyard.quantization import NEVER_ONLINE, LinearMethod, QuantizationMethod

INSTALL = "torchao is not installed: pip install torchao"


def recipe(name: str):
    """--torchao-config value -> a torchao quantize_ config."""
    try:
        import torchao.quantization as tq
    except ImportError:
        raise ValueError(f"torchao_config: {INSTALL}") from None
    if name == "int8wo":
        return tq.Int8WeightOnlyConfig()
    if name == "int8dq":
        return tq.Int8DynamicActivationInt8WeightConfig()
    if name.startswith("int4wo-"):
        return tq.Int4WeightOnlyConfig(group_size=int(name.split("-", 1)[1]))
    if name == "fp8wo":
        return tq.Float8WeightOnlyConfig()
    if name in ("fp8dq-per_tensor", "fp8dq-per_row"):
        granularity = tq.PerTensor() if name.endswith("tensor") else tq.PerRow()
        return tq.Float8DynamicActivationFloat8WeightConfig(granularity=granularity)
    raise ValueError(f"torchao_config: unknown recipe {name!r}")


class TorchaoLinearMethod(ShardedLinearMethod):
    def __init__(self, dtype, device, name: str):
        self.dtype, self.device, self.name = dtype, torch.device(device), name

    def finalize(self, layer, parts) -> None:
        from torchao.quantization import quantize_

        weight = torch.cat([p["weight"].to(self.dtype) for p in parts])
        self.check_shape(layer, 0, "weight", weight, (layer.out_features, layer.in_features))
        inner = nn.Linear(layer.in_features, layer.out_features, bias=False, dtype=self.dtype, device=self.device)
        inner.weight = nn.Parameter(weight.to(self.device), requires_grad=False)
        try:
            quantize_(inner, recipe(self.name))
        except (ImportError, AssertionError, RuntimeError, NotImplementedError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"torchao_config: {self.name} does not run on {self.device.type} here: {first}") from None
        layer.torchao_linear = inner

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        return _unflat(layer, x, layer.torchao_linear(_flat(layer, x).to(self.dtype)))


class TorchaoQuantization(QuantizationMethod):
    name = "torchao"
    online = True

    def __init__(self, config):
        super().__init__(config)
        self.recipe_name = (config.options or {}).get("torchao_config") or "int8wo"
        recipe(self.recipe_name)   # fails early (one line) when torchao is missing

    def linear_method(self, prefix: str) -> LinearMethod:
        if prefix in NEVER_ONLINE:
            return self.unquantized()
        return TorchaoLinearMethod(self.config.dtype, self.config.device, self.recipe_name)
