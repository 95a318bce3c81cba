"""SiLU-and-mul: x [..., 2d] = [gate | up] -> silu(gate) * up [..., d].

Grid (rows, column blocks). silu is rounded to the activation dtype before the multiply, as
the torch path (F.silu then mul_) does.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvyard.kernels.triton_ops.common import pdl_enter, pdl_launch, rows_2d

BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(X, OUT, stride_x, stride_o, D, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + D + cols, mask=mask, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(OUT.dtype.element_ty).to(tl.float32)
    tl.store(OUT + row * stride_o + cols, (silu * up).to(OUT.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] % 2:
        raise ValueError(f"the last dim of x must be even ([gate | up]), got {x.shape[-1]}")
    d = x.shape[-1] // 2
    x2 = rows_2d(x)
    out = torch.empty((x2.shape[0], d), dtype=x.dtype, device=x.device)
    if x2.shape[0] and d:
        block = min(BLOCK, triton.next_power_of_2(d))
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](
            x2, out, x2.stride(0), out.stride(0), d, BLOCK=block, **pdl_launch(x2))
    return out.view(*x.shape[:-1], d)
