"""Launch helpers and jitted tile helpers shared by the fused and GEMM kernels."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


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


def may_autotune(x: torch.Tensor, key: tuple, tuned_keys: set) -> bool:
    """Whether a call of an autotuned kernel on ``x`` may time its configs: on CUDA (the CPU
    interpreter does not time), and not for a shape first seen inside a CUDA-graph capture (the
    runner's eager warm-up tunes every captured shape before it; such a shape takes the caller's
    untimed fallback). Adds ``key`` to ``tuned_keys`` when it may."""
    if x.is_cuda and (key in tuned_keys or not torch.cuda.is_current_stream_capturing()):
        tuned_keys.add(key)
        return True
    return False


@triton.jit
def tile_offsets(pid_m, pid_n, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The rows and columns of output tile (pid_m, pid_n) and their in-bounds masks:
    (offs_m [BLOCK_M], offs_n [BLOCK_N], offs_m < M, offs_n < N)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, offs_m < M, offs_n < N
