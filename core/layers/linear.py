"""Linear: one projection, or several fused along the output dim (qkv, gate_up).

``output_sizes`` lists the fused outputs in order, so a checkpoint's q_proj/k_proj/v_proj load
as shards 0/1/2 of one qkv layer. Storage and matmul belong to the LinearMethod (quantization.py).
``lora_hook`` (None unless LoRA serving attached one: kvyard.lora) runs after that matmul,
whatever the method computed: ``y = hook(x, y)``.
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
        self.lora_hook = None   # kvyard.lora.hook.LoRAHook when LoRA serving targets this layer

    def load_shard(self, shard: int, weight: Any) -> None:
        self.method.load_shard(self, shard, weight)

    def load_tensor(self, shard: int, name: str, tensor: Any) -> None:
        """Checkpoint tensor ``<part>.<name>`` (weight, weight_scale, qweight, ...) of shard."""
        self.method.load_tensor(self, shard, name, tensor)

    def checkpoint_targets(self, parts: Sequence[str]) -> tuple[dict, dict]:
        """(required, optional) maps from checkpoint names to loaders. ``parts`` are the
        checkpoint prefixes of the shards in order (e.g. "...q_proj", "...k_proj", "...v_proj");
        the bias is required when the layer has one."""
        from functools import partial

        required, optional = {}, {}
        for shard, part in enumerate(parts):
            for name in self.method.checkpoint_names:
                required[f"{part}.{name}"] = partial(self.load_tensor, shard, name)
            for name in self.method.optional_checkpoint_names:
                optional[f"{part}.{name}"] = partial(self.load_tensor, shard, name)
            if self.bias is not None:
                required[f"{part}.bias"] = partial(self.load_bias_shard, shard)
        return required, optional

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
        y = self.method.apply(self, x)
        return y if self.lora_hook is None else self.lora_hook(x, y)

    def split(self, y: torch.Tensor) -> list[torch.Tensor]:
        return list(y.split(self.output_sizes, dim=-1))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.output_sizes}, method={type(self.method).__name__}"


def process_linears_after_loading(model: nn.Module) -> None:
    """Every Linear of ``model`` finishes loading (repacking, scales): call once all weights are in."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.process_after_loading()
