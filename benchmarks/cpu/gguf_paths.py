"""The GGUF kernel paths at SmolLM2-135M's projection shapes, one matmul at a time (weights hot):
the int kernel against dequantize + gemm ("dense") at decode-batch sizes, and the dense path on
the 16-row interleaved layout (X16, what AVX-512 loads) against the planar one. Median of 5
timings of a few calls each, microseconds per call; bfloat16 activations.

    python benchmarks/cpu/gguf_paths.py --m 16 32 48            # int vs dense, X16 layout
    python benchmarks/cpu/gguf_paths.py --m 32 512 --layouts    # dense: X16 vs planar
"""
from __future__ import annotations

import argparse
import statistics
import time

import gguf
import numpy as np
import torch

from kvyard_plugins.quantization import gguf_kernels as gk

Q = gguf.GGMLQuantizationType
SHAPES = (("qkv", 960, 576, Q.Q4_1), ("o", 576, 576, Q.Q4_1), ("gate_up", 3072, 576, Q.Q4_1),
          ("down", 576, 1536, Q.Q4_1), ("lm_head", 49152, 576, Q.Q8_0))


def per_call_us(fn, calls: int) -> float:
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, nargs="+", default=[16, 32, 48], help="activation rows")
    p.add_argument("--layouts", action="store_true", help="dense path: X16 against planar (else int against dense)")
    p.add_argument("--threads", type=int, default=2)
    ns = p.parse_args()
    gk.load()
    if gk.simd_level() != "avx512":
        raise SystemExit("the X16 layout needs the AVX-512 int kernel (this CPU or build has none)")
    torch.set_num_threads(ns.threads)
    rng = np.random.default_rng(0)
    for name, n, k, qtype in SHAPES:
        raw = torch.from_numpy(gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32) * 0.05, qtype))
        x16 = (torch.ops.kvyard_gguf.repack_x16(raw, int(qtype), k), gk.X16_BASE + int(qtype))
        planar = (torch.ops.kvyard_gguf.repack(raw, int(qtype), k), gk.PLANAR_BASE + int(qtype))
        calls = 3 if name == "lm_head" else 10
        for m in ns.m:
            x = torch.randn(m, k, dtype=torch.bfloat16)
            if ns.layouts:
                a = per_call_us(lambda: gk.matmul(x, *x16, k, path="dense"), calls)
                b = per_call_us(lambda: gk.matmul(x, *planar, k, path="dense"), calls)
                print(f"{name:8s} M={m:4d}  dense X16 {a:9.1f} us  dense planar {b:9.1f} us  X16/planar {a / b:.2f}")
            else:
                a = per_call_us(lambda: gk.matmul(x, *x16, k, path="int"), calls)
                b = per_call_us(lambda: gk.matmul(x, *x16, k, path="dense"), calls)
                print(f"{name:8s} M={m:4d}  int {a:9.1f} us  dense {b:9.1f} us  int/dense {a / b:.2f}")


if __name__ == "__main__":
    main()
