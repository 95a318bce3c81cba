"""Checkpoint-tensor helpers shared by the model layers."""
from __future__ import annotations

from typing import Any

import torch


def as_dense(weight: Any, name: str) -> torch.Tensor:
    """A plain tensor from a checkpoint entry: torch.Tensor, or anything with ``dequantize()``
    (kvyard.loader.QuantizedTensor). ``name`` is the checkpoint name, for the error message."""
    if isinstance(weight, torch.Tensor):
        return weight
    if hasattr(weight, "dequantize"):
        return weight.dequantize()
    raise TypeError(f"{name}: cannot load a checkpoint entry of type {type(weight).__name__}")


def copy_checked(param: torch.Tensor, weight: Any, name: str) -> None:
    """Copies a checkpoint entry into ``param`` (casting dtype/device); a shape mismatch is an
    error naming the checkpoint entry."""
    dense = as_dense(weight, name)
    if tuple(dense.shape) != tuple(param.shape):
        raise ValueError(f"{name}: checkpoint shape {tuple(dense.shape)} does not match "
                         f"the model's {tuple(param.shape)}")
    param.data.copy_(dense)
