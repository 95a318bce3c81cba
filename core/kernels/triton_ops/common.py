"""Launch helpers shared by the fused kernels."""
from __future__ import annotations

import triton


def block_for(n: int, minimum: int = 16) -> int:
    """The power-of-two block that covers ``n`` elements in one program."""
    return max(minimum, triton.next_power_of_2(n))


def warps_for(block: int) -> int:
    """4 warps up to 2K elements a row, up to 16 warps for long rows (8K hidden and above)."""
    return min(16, max(4, block // 512))


def rows_2d(x):
    """A [rows, width] view of ``x`` [..., width] whose last dim is contiguous."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2
