"""The GGUF matmuls of one SmolLM2-135M decode step (batch 1), alone: 30 layers of q/k/v, o,
gate/up and down in Q4_1 plus the Q8_0 LM head, every layer its own weights (92 MB, streamed as
in the real step), bfloat16 activations. Per SIMD level (each with the layout prepare() gives
at that level; levels alternate pass by pass) it prints the median and spread of the step's
matmul time, wall and this process's CPU time, and the weight bytes per second.

    OMP_NUM_THREADS=1 python benchmarks/cpu/gguf_step_matmuls.py --threads 1 --simd avx2 avx512

With --hot one layer's weights are reused 30 times instead (they stay in L2: the kernel's
arithmetic alone, without the stream from memory).
"""
from __future__ import annotations

import argparse
import statistics
import time

import gguf
import numpy as np
import torch

from kvyard_plugins.quantization import gguf_kernels

Q = gguf.GGMLQuantizationType
HIDDEN, INTER, KV, LAYERS, VOCAB = 576, 1536, 192, 30, 49152


def blocks(qtype: Q, n: int, k: int, rng: np.random.Generator) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.quantize(rng.standard_normal((n, k), dtype=np.float32) * 0.02, qtype))


def step_weights(hot: bool) -> list[tuple[np.ndarray, Q, int]]:
    """(file blocks, type, in_features) in the step's order."""
    rng = np.random.default_rng(0)
    layer = [(blocks(Q.Q4_1, HIDDEN + 2 * KV, HIDDEN, rng), Q.Q4_1, HIDDEN),
             (blocks(Q.Q4_1, HIDDEN, HIDDEN, rng), Q.Q4_1, HIDDEN),
             (blocks(Q.Q4_1, 2 * INTER, HIDDEN, rng), Q.Q4_1, HIDDEN),
             (blocks(Q.Q4_1, HIDDEN, INTER, rng), Q.Q4_1, INTER)]
    layers = [layer] * LAYERS if hot else [layer] + [
        [(blocks(q, w.shape[0], k, rng), q, k) for w, q, k in layer] for _ in range(LAYERS - 1)]
    return [w for lay in layers for w in lay] + [(blocks(Q.Q8_0, VOCAB, HIDDEN, rng), Q.Q8_0, HIDDEN)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--simd", nargs="+", choices=gguf_kernels.SIMD_LEVELS, default=["avx2", "avx512"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--passes", type=int, default=15)
    p.add_argument("--hot", action="store_true", help="one layer's weights for every layer")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gguf_kernels.load()
    raw = step_weights(args.hot)
    nbytes = sum(w.numel() for w, _, _ in raw)
    prepared = {}
    for level in args.simd:
        gguf_kernels.set_simd_level(level)
        prepared[level] = [(*gguf_kernels.prepare(w, q, k), k) for w, q, k in raw]
    xs = {k: torch.randn(1, k).to(torch.bfloat16) for k in (HIDDEN, INTER)}
    times: dict[str, list[tuple[float, float]]] = {level: [] for level in args.simd}
    for _ in range(args.passes):
        for level in args.simd:
            gguf_kernels.set_simd_level(level)
            w0, c0 = time.perf_counter(), time.process_time()
            for w, layout, k in prepared[level]:
                gguf_kernels.matmul(xs[k], w, layout, k, path="int")
            times[level].append((time.perf_counter() - w0, time.process_time() - c0))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {len(raw)} matmuls, "
          f"{nbytes / 1e6:.1f} MB of weights{' (one layer reused: hot)' if args.hot else ''}")
    for level, rows in times.items():
        wall = sorted(1e3 * w for w, _ in rows)
        cpu = sorted(1e3 * c for _, c in rows)
        print(f"  {level:<8} wall ms median {statistics.median(wall):7.2f} (min {wall[0]:.2f}, max {wall[-1]:.2f})"
              f"  cpu ms median {statistics.median(cpu):7.2f}  {nbytes / statistics.median(wall) / 1e6:5.1f} GB/s")


if __name__ == "__main__":
    main()
