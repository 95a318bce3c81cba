"""Launch helpers and jitted tile helpers shared by the fused and GEMM kernels.

Programmatic dependent launch (PDL, sm_90+): a kernel launched with ``pdl_launch(x)``'s
arguments may start while the kernel before it in the stream still runs. Invariant of every
kernel that takes them: ``pdl_enter(PDL)`` runs in every program before it reads anything the
previous kernel may write or writes anything at all (what it loads before is immutable:
weights), so each kernel still sees its predecessor complete, and a chain of them completes
in stream order. pdl_enter then lets the next kernel launch; its programs wait in their own
pdl_enter, so the launch latency hides behind this kernel's work instead of following it.
``KVYARD_PDL=0`` launches every kernel plainly (an A/B switch for benchmarks; read at import,
inherited by the scheduler processes).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:    # Triton >= 3.4: griddepcontrol.wait / launch_dependents
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    _GDC = True
except ImportError:     # pragma: no cover - older Triton: plain launches
    gdc_launch_dependents = gdc_wait = None
    _GDC = False
PDL_ENABLED = os.environ.get("KVYARD_PDL", "1").strip().lower() not in ("0", "false", "no", "off")


@functools.lru_cache(maxsize=None)
def _pdl_device(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_ok(x: torch.Tensor) -> bool:
    """Whether kernels on ``x``'s device may launch as programmatic dependents: a CUDA device
    of sm_90 or newer, Triton with the gdc ops, KVYARD_PDL not off."""
    return PDL_ENABLED and _GDC and x.is_cuda and _pdl_device(x.device.index or 0)


def pdl_launch(x: torch.Tensor) -> dict:
    """Launch arguments for a kernel with a ``PDL`` constexpr: {PDL, launch_pdl} where pdl_ok."""
    return dict(PDL=True, launch_pdl=True) if pdl_ok(x) else dict(PDL=False)


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """Wait for the previous kernel (complete, its writes visible), then let the next launch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


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
