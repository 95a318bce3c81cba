"""Times the CPU paged decode attention kernel (plugins/attention/cpu_kernels/paged_decode.cpp) on
SmolLM2's head shapes, optionally beside the same kernel's source at another git revision.

    python benchmarks/cpu/paged_decode.py --batch 32 --context 192 --threads 1 --against 47a0f8d~1

Slots are a random permutation of the pool (as a long-running server's are); each figure is the
best of --runs calls after a warm-up (robust on a shared machine).
"""
from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from kvyard.kernels.cpp_build import CppLibrary, load_library
from kvyard_plugins.attention import cpu_kernels

SOURCE = "plugins/attention/cpu_kernels/paged_decode.cpp"


def kernel_at(rev: str):
    """The kernel's op as built from ``rev``'s source, in a namespace of its own."""
    text = subprocess.run(["git", "show", f"{rev}:{SOURCE}"], capture_output=True, text=True, check=True).stdout
    namespace = "kvyard_attn_" + "".join(c for c in rev if c.isalnum())
    path = Path(tempfile.mkdtemp()) / f"{namespace}.cpp"
    path.write_text(text.replace("kvyard_attn", namespace))
    load_library(CppLibrary(name=namespace, sources=(path,)))
    return getattr(torch.ops, namespace).paged_decode


def best_ms(fn, runs: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=192)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--against", help="a git revision whose kernel source is timed beside this one")
    ns = p.parse_args()
    torch.set_num_threads(ns.threads)
    if not cpu_kernels.available():
        raise SystemExit("the CPU attention kernels do not build here")
    slots = 70_000
    k_pool = torch.randn(slots, ns.kv_heads, ns.head_dim)
    v_pool = torch.randn(slots, ns.kv_heads, ns.head_dim)
    table = torch.zeros(ns.batch + 1, ns.context, dtype=torch.int32)
    table[1:] = (torch.randperm(slots - 1)[: ns.batch * ns.context] + 1).view(ns.batch, ns.context).int()
    rows, lens = torch.arange(1, ns.batch + 1), torch.full((ns.batch,), ns.context)
    q = torch.randn(ns.batch, ns.heads, ns.head_dim)
    args = (q, k_pool, v_pool, table, rows, lens, ns.head_dim ** -0.5)
    kernels = {"this tree": cpu_kernels.paged_decode}
    if ns.against:
        kernels[ns.against] = kernel_at(ns.against)
    print(f"paged decode, batch {ns.batch} x {ns.context} tokens, {ns.heads}/{ns.kv_heads} heads of "
          f"{ns.head_dim}, {ns.threads} thread(s), best of {ns.runs}:")
    for name, op in kernels.items():
        print(f"  {name:>12}: {best_ms(lambda: op(*args), ns.runs):.3f} ms per layer")


if __name__ == "__main__":
    main()
