"""The one place that decides, per fused op, between a Triton kernel, a C++ CPU kernel and the
plain torch code.

Ops (each has a torch path in its layer and a Triton kernel in kvyard.kernels.triton_ops):
  rmsnorm        RMSNorm with the fused residual add           (layers/norm.py)
  silu_and_mul   silu(gate) * up                               (layers/activation.py)
  rotary         rotary embedding from the cos/sin rows         (layers/rotary.py)
  kv_write       k/v of the new tokens into the paged KV pool   (mem_cache/kv_pool.py)
  fused_moe      routed experts as grouped GEMMs by expert      (layers/moe.py; no C++ CPU kernel)

Rule: a CUDA tensor takes the Triton kernel when triton imports (on the CPU only when a test forces
the Triton interpreter with ``force_triton`` while TRITON_INTERPRET=1 is set). A CPU tensor of at
most CPU_KERNEL_MAX_ROWS rows (decode, small batches) takes the C++ kernel of kvyard.kernels.cpu_ops when it
builds: there one call replaces a chain of ATen calls whose dispatch costs more than their
arithmetic (measured on SmolLM2 batch-1 decode: 61 RMSNorms at ~90 us each as 8 ATen calls). Larger
CPU inputs (prefill) keep the torch path, where the dispatch cost is amortized.

Environment:
  KVYARD_TRITON_OPS   comma-separated ops (or "all" / "none"): overrides the rule for every device.
                      "none" turns the fused kernels off on CUDA; a list on the CPU needs
                      TRITON_INTERPRET=1. Read once at import; it reaches spawned scheduler
                      processes because they inherit the environment.
  KVYARD_CPU_OPS      "none" (or "0") turns the C++ CPU kernels off, leaving the torch path.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterable, Iterator, Optional, Union

import torch

from kvyard.kernels import cpu_ops

OPS = ("rmsnorm", "silu_and_mul", "rotary", "kv_write", "fused_moe")


def _parse_ops(text: Optional[str]) -> Optional[frozenset[str]]:
    if text is None or text.strip() == "":
        return None
    text = text.strip().lower()
    if text == "all":
        return frozenset(OPS)
    if text == "none":
        return frozenset()
    ops = frozenset(part.strip() for part in text.split(",") if part.strip())
    unknown = sorted(ops - set(OPS))
    if unknown:
        raise ValueError(f"KVYARD_TRITON_OPS: unknown op(s) {', '.join(unknown)}; valid: {', '.join(OPS)}, all, none")
    return ops


# None: the device rule decides; a set: exactly these ops use Triton (on any device)
_override: Optional[frozenset[str]] = _parse_ops(os.environ.get("KVYARD_TRITON_OPS"))


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# use_triton and use_cpu_kernel run for every layer op of every step: they read tensor flags
# (is_cuda, is_cpu) rather than building torch.device objects, and import nothing.
def use_triton(op: str, device: Union[torch.device, str, torch.Tensor]) -> bool:
    """Whether ``op`` runs as a Triton kernel for tensors on ``device`` (a tensor is accepted)."""
    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}, got {op!r}")
    on_cuda = device.is_cuda if isinstance(device, torch.Tensor) else _device_type(device) == "cuda"
    if _override is not None:
        if op not in _override or not triton_available():
            return False
        return on_cuda or interpreting()
    return on_cuda and triton_available()


# Above this many rows a CPU call keeps the torch path (see the rule above).
CPU_KERNEL_MAX_ROWS = 128
_CPU_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
_cpu_kernels_off = os.environ.get("KVYARD_CPU_OPS", "").strip().lower() in ("none", "0", "false")


def use_cpu_kernel(op: str, x: torch.Tensor) -> bool:
    """Whether ``op`` on the CPU tensor ``x`` ([rows, ...]) runs as kvyard.kernels.cpu_ops' C++ kernel."""
    if _cpu_kernels_off or not x.is_cpu or x.dtype not in _CPU_KERNEL_DTYPES:
        return False
    if x.dim() == 0 or x.shape[0] > CPU_KERNEL_MAX_ROWS:
        return False
    if _override is not None and use_triton(op, x):   # a test routes this op to the interpreter
        return False
    return cpu_ops.available()


def _device_type(device: Union[torch.device, str]) -> str:
    return device.type if isinstance(device, torch.device) else torch.device(device).type


@contextlib.contextmanager
def cpu_kernels_disabled() -> Iterator[None]:
    """Tests: the torch path for CPU tensors inside the block (as KVYARD_CPU_OPS=none)."""
    global _cpu_kernels_off
    saved, _cpu_kernels_off = _cpu_kernels_off, True
    try:
        yield
    finally:
        _cpu_kernels_off = saved


@contextlib.contextmanager
def force_triton(ops: Iterable[str] = OPS) -> Iterator[None]:
    """Tests: route ``ops`` (and only those) to Triton inside the block, on any device."""
    global _override
    wanted = frozenset(ops)
    unknown = sorted(wanted - set(OPS))
    if unknown:
        raise ValueError(f"ops: unknown op(s) {', '.join(unknown)}; valid: {', '.join(OPS)}")
    saved, _override = _override, wanted
    try:
        yield
    finally:
        _override = saved
