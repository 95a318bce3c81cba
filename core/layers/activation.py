"""Gated activations: the input holds [gate | up] along the last dim (a fused gate_up_proj)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvyard.kernels import cpu_ops
from kvyard.kernels import use_cpu_kernel, use_triton


class SiluAndMul(nn.Module):
    """x [..., 2 * d] -> silu(x[..., :d]) * x[..., d:]  of shape [..., d]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_triton("silu_and_mul", x):
            from kvyard.kernels.triton_ops.activation import silu_and_mul
            return silu_and_mul(x)
        if use_cpu_kernel("silu_and_mul", x):
            return cpu_ops.silu_and_mul(x)
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]).mul_(x[..., d:])


class GeluAndMul(nn.Module):
    """x [..., 2 * d] -> gelu(x[..., :d]) * x[..., d:]; approximate "none" or "tanh"."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return F.gelu(x[..., :d], approximate=self.approximate).mul_(x[..., d:])
