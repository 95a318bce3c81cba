"""RMSNorm with an optional fused residual add; GemmaRMSNorm, Gemma's variant.

Decoder layers carry the residual stream through their norms:
    normed, residual = norm(x, residual)   # residual <- x + residual; normed <- rms(residual)
so the add happens once, inside the norm call, and no layer keeps its own copy.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kvyard.kernels import cpu_ops
from kvyard.kernels import use_cpu_kernel, use_triton


class RMSNorm(nn.Module):
    fused_kernels = True      # the triton / C++ rmsnorm kernels compute this exact variant
    initial_weight = 1.0

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.full((hidden_size,), self.initial_weight, dtype=dtype, device=device),
                                   requires_grad=False)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        """x [..., hidden] -> normed; with ``residual`` -> (normed, x + residual)."""
        if self.fused_kernels and use_triton("rmsnorm", x):
            from kvyard.kernels.triton_ops.rmsnorm import rmsnorm
            return rmsnorm(x, self.weight, self.eps, residual)
        if self.fused_kernels and use_cpu_kernel("rmsnorm", x):
            return cpu_ops.rmsnorm(x, self.weight, self.eps, residual)
        if residual is None:
            return self._normalize(x)
        summed = x + residual
        return self._normalize(summed), summed

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in float32 whatever the activation dtype; the weight multiplies the result
        # cast back to the activation dtype (the HF order of operations, so float32 matches bitwise).
        # Written out instead of F.rms_norm: on the CPU that kernel is ~10x slower for long prefills.
        xf = x.float()
        inv_rms = xf.pow(2).mean(-1, keepdim=True).add_(self.eps).rsqrt_()
        normed = (xf * inv_rms).to(x.dtype)
        return normed.mul_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: x * rsqrt(mean(x^2) + eps) * (1 + weight), all in float32, cast back at
    the end (Llama casts before the weight; the stored weight is the offset from 1). With
    ``residual``: (normed, x + residual), as RMSNorm. Torch code only (the fused kernels
    compute RMSNorm's order of operations)."""

    fused_kernels = False
    initial_weight = 0.0

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * xf.pow(2).mean(-1, keepdim=True).add_(self.eps).rsqrt_()
        return (normed * (1.0 + self.weight.float())).to(x.dtype)
