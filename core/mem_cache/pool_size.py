"""The default size of the CPU KV pool when --max-total-tokens is unset.

    tokens = max(MIN_POOL_TOKENS, min(CPU_KV_CONTEXTS x context_length,
                                      CPU_KV_MEMORY_FRACTION x available RAM / bytes per token))

A pool of a few full contexts serves a handful of long requests or many short ones at once; the
memory cap keeps a long-context model from taking the machine (available RAM is psutil's
``available``, read when the scheduler starts). The pool's pages are zero-filled lazily
(kv_pool.py), so its resident memory grows with the tokens actually stored, not with this size.
The CUDA pool is sized from --mem-fraction-static instead (model_runner.py).
"""
from __future__ import annotations

CPU_KV_CONTEXTS = 4             # full contexts the default pool holds
CPU_KV_MEMORY_FRACTION = 0.4    # of available RAM, at most
MIN_POOL_TOKENS = 1024          # the floor, whatever the memory says
FORMULA = (f"CPU default: min({CPU_KV_CONTEXTS} x context length, {CPU_KV_MEMORY_FRACTION:g} x available RAM "
           f"/ KV bytes per token), at least {MIN_POOL_TOKENS}")


def default_cpu_pool_tokens(context_length: int, bytes_per_token: int, available_bytes: int) -> int:
    """The formula above; bytes_per_token: the KV layout's bytes per slot over all layers."""
    by_memory = int(available_bytes * CPU_KV_MEMORY_FRACTION) // bytes_per_token
    return max(MIN_POOL_TOKENS, min(CPU_KV_CONTEXTS * context_length, by_memory))


def available_memory() -> int:
    """Bytes of RAM available to a new allocation (psutil; /proc/meminfo without it)."""
    try:
        import psutil
        return psutil.virtual_memory().available
    except ImportError:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return 4 * 2**30
