"""Micro-benchmark of the GGUF fused dequantize-matmul against a dense fp32 F.linear.

For each weight type, SmolLM2-135M shape (in_features x out_features) and batch M it prints the
best time of many runs (robust on a shared, contended machine), GFLOP/s (2*M*N*K / t) and GB/s of weight bytes streamed (quantized bytes / t), for
the path the method picks ("auto") and, with --all-paths, for both kernels.

    python benchmarks/gguf_matmul.py
    python benchmarks/gguf_matmul.py --qtypes Q4_1 Q8_0 --ms 1 32 --dtype bfloat16 --all-paths
    python benchmarks/gguf_matmul.py --qtypes Q4_1 Q8_0 --ms 1 --simd avx2 avx512 --no-dense

--simd times the int kernel at each SIMD level (gguf_kernels.SIMD_LEVELS) in the same process,
the levels alternating pass by pass (--passes), and prints each level's median and spread of the
per-pass best times: an A/B that a shared machine's load changes less.
"""
from __future__ import annotations

import argparse
import time

import gguf
import numpy as np
import torch
import torch.nn.functional as F

from kvyard_plugins.quantization import gguf_kernels

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]   # (K, N)


def best_seconds(fn, min_time: float = 0.3, max_runs: int = 200) -> float:
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs and (time.perf_counter() - start < min_time or len(times) < 3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def random_weight(qtype: gguf.GGMLQuantizationType, n: int, k: int) -> torch.Tensor:
    """Quantized random weights; K-quants (which gguf cannot quantize) get random valid bytes."""
    rng = np.random.default_rng(0)
    if qtype in gguf_kernels.PY_QUANTIZABLE:
        values = rng.standard_normal((n, k), dtype=np.float32) * 0.02
        return torch.from_numpy(gguf.quants.quantize(values, qtype))
    return torch.from_numpy(gguf_kernels.random_blocks(qtype, n, k, rng))


def simd_ab(levels: list[str], fns: dict, passes: int) -> dict[str, list[float]]:
    """Per level, the best time of each pass of fns[level]; levels alternate within every pass."""
    times: dict[str, list[float]] = {level: [] for level in levels}
    for _ in range(passes):
        for level in levels:
            gguf_kernels.set_simd_level(level)
            times[level].append(best_seconds(fns[level], min_time=0.05, max_runs=50))
    gguf_kernels.set_simd_level(gguf_kernels.SIMD_LEVELS[-1])
    return times


def report_ab(times: dict[str, list[float]]) -> None:
    for level, ts in times.items():
        us = np.array(ts) * 1e6
        print(f"  {level:<10} median {np.median(us):9.1f} us  (min {us.min():.1f}, max {us.max():.1f}, "
              f"{len(us)} passes)")


def report(label: str, t: float, m: int, n: int, k: int, nbytes: int) -> None:
    print(f"  {label:<10} {t * 1e6:10.1f} us {2 * m * n * k / t / 1e9:8.1f} GFLOP/s "
          f"{nbytes / t / 1e9:7.1f} GB/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qtypes", nargs="+", default=["Q4_1", "Q8_0", "Q4_K", "Q6_K"])
    parser.add_argument("--ms", nargs="+", type=int, default=[1, 8, 32, 128])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--all-paths", action="store_true", help="time both kernels every time")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense F.linear baseline")
    parser.add_argument("--shapes", nargs="+", default=None, metavar="KxN",
                        help="in_features x out_features pairs (default: the SmolLM2 ones)")
    parser.add_argument("--simd", nargs="+", choices=gguf_kernels.SIMD_LEVELS, default=None,
                        help="A/B the int kernel's SIMD levels in this process (M < DENSE_MIN_M)")
    parser.add_argument("--passes", type=int, default=9, help="passes of a --simd A/B")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 gives stable numbers on a shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = ([tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes
              else SHAPES)
    dtype = getattr(torch, args.dtype)
    gguf_kernels.load()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"native bf16 gemm: {gguf_kernels.native_bf16()}")
    for name in args.qtypes:
        qtype = gguf.GGMLQuantizationType[name]
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        for k, n in shapes:
            if k % block:
                print(f"{name} {k}x{n}: skipped (in_features not a multiple of {block})")
                continue
            w, layout = gguf_kernels.prepare(random_weight(qtype, n, k), qtype, k)
            dense = gguf_kernels.dequantize(w, layout, k, dtype)
            for m in args.ms:
                x = torch.randn(m, k, dtype=dtype)
                print(f"{name} {k}x{n} M={m} ({w.numel() / 1e6:.2f} MB quantized)")
                if args.simd:   # each level multiplies the layout prepare() gives at that level
                    fns = {}
                    for level in args.simd:
                        gguf_kernels.set_simd_level(level)
                        wl, ll = gguf_kernels.prepare(random_weight(qtype, n, k), qtype, k)
                        fns[level] = (lambda x=x, wl=wl, ll=ll:
                                      gguf_kernels.matmul(x, wl, ll, k, path="int"))
                    report_ab(simd_ab(args.simd, fns, args.passes))
                    continue
                report("auto", best_seconds(lambda: gguf_kernels.matmul(x, w, layout, k)),
                       m, n, k, w.numel())
                if args.all_paths:
                    for path in ("int", "dense"):
                        t = best_seconds(lambda: gguf_kernels.matmul(x, w, layout, k, path=path))
                        report(path, t, m, n, k, w.numel())
                if not args.no_dense:
                    report("F.linear", best_seconds(lambda: F.linear(x, dense)), m, n, k,
                           dense.numel() * dense.element_size())


if __name__ == "__main__":
    main()
