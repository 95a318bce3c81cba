"""Every one-row int4 GEMV tiling at every K split, on the GPU, at Llama-3.1-8B projection shapes.

Each (shape, config, split) is timed as CUDA-graph replays of a chain of calls that cycles
through enough copies of the weight (> 2x the 50 MB L2) that no call finds its weight in L2,
as in a decode step (every layer its own weights). One JSON line per row (us per call, the
weight bytes read per microsecond), then the fastest rows per shape and the autotuned call
(int4_gemm without split / config: the one-row plan where it applies, else autotuned) beside them.

    python benchmarks/int4_gemv_sweep.py [--splits 1 2 4 8 16 32] [--group 128]
"""
from __future__ import annotations

import argparse
import json

import torch

from kvyard.kernels.triton_ops import int4_gemm as i4
from kvyard.layers import quant_math as qm
from kvyard.layers.quantized_linear import int4_kernel_layout

SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]   # (K, N): qkv, o, gate_up, down
L2_BYTES = 50 << 20


def weights(k: int, n: int, group: int, copies: int):
    w = torch.randn(n, k, device="cuda") * 0.02
    q, s, z = qm.quantize_int4(w, group, symmetric=False)
    s, z = s.t().contiguous().to(torch.bfloat16), z.t().contiguous().to(torch.uint8)     # [G, N]
    layout = int4_kernel_layout(qm.pack_int4_rows(q.t().contiguous()), s, z)
    g_idx = torch.arange(k, dtype=torch.int32, device="cuda") // group
    return [tuple(t.clone() for t in layout) + (g_idx,) for _ in range(copies)]


def graph_us(fn_per_copy, reps: int = 20) -> float:
    """us per call: one graph of a call per weight copy (each once), replayed ``reps`` times."""
    for fn in fn_per_copy:            # eager first: compiles, and any autotuning, outside the capture
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fn_per_copy:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (reps * len(fn_per_copy))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--splits", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--group", type=int, default=128)
    args = ap.parse_args()
    torch.manual_seed(0)
    configs = i4.GEMV_CONFIGS[1]
    for k, n in SHAPES:
        nbytes = k * n // 2 + (k // args.group) * n * 3
        copies = max(2, -(-2 * L2_BYTES // nbytes))
        ws = weights(k, n, args.group, copies)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        rows = []
        for cfg in configs:
            if not i4.path_fits(cfg, args.group, x.dtype):
                continue
            for split in args.splits:
                name = "{BLOCK_N}x{BLOCK_K}/w{warps}/s{stages}/wpt{WPT}{d}{p}".format(
                    **cfg.kwargs, warps=cfg.num_warps, stages=cfg.num_stages, d="/dot16" if cfg.kwargs["DOT16"] else "",
                    p="/pipe" if cfg.kwargs["PIPE"] else "")
                try:
                    us = graph_us([lambda w=w: i4.int4_gemm(x, *w[:3], w[3], args.group, split=split, config=cfg)
                                   for w in ws])
                except (ValueError, RuntimeError) as exc:     # the split is not tiled by the config
                    if "does not serve" not in str(exc):
                        print(json.dumps({"k": k, "n": n, "config": name, "split": split,
                                          "error": str(exc).splitlines()[0][:160]}))
                    continue
                row = {"k": k, "n": n, "config": name, "split": split, "us": round(us, 2),
                       "GB/s": round(nbytes / us / 1e3, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
        auto = graph_us([lambda w=w: i4.int4_gemm(x, *w[:3], w[3], args.group) for w in ws])
        best = sorted(rows, key=lambda r: r["us"])[:5]
        print(json.dumps({"k": k, "n": n, "autotuned_us": round(auto, 2),
                          "one_row_plan": str(i4._one_row_plan(x, n, k, args.group)),
                          "tuned": str(getattr(i4._mm_tuned, "best_config", None)), "best": best}), flush=True)


if __name__ == "__main__":
    main()
