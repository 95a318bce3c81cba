"""GPU micro-benchmark of the quantized linear paths at Llama-3.1-8B projection shapes.

For each (M, K, N) it times, with CUDA events (median of `--iters` after warm-up):
  bf16           F.linear (cuBLAS), the reference
  fp8-scaled_mm  per-token fp8 quantization of x + torch._scaled_mm with row-wise scales
                 (what Fp8LinearMethod runs on the GPU), and the GEMM alone
  fp8-dequant    dequantize the fp8 weight to bf16, then F.linear (the non-Hopper path)
  int8           per-token int8 quantization + torch._int_mm + both scales (Int8LinearMethod)
  fp8-block      128x128 block-scaled fp8 (per-token-group x): the Triton block-scaled GEMM
                 (kvyard.kernels.triton_ops.fp8_block_gemm), quantization of x included
  fp8-quant1-scaled_mm  per-token quantization of x in one Triton launch
                 (kvyard.kernels.triton_ops.fp8_quant) + torch._scaled_mm (what Fp8LinearMethod
                 runs on CUDA above 16 rows); fp8-quant1: the quantization kernel alone
  fp8-w8a16      M <= 16: the weight-only fp8 GEMV (kvyard.kernels.triton_ops.fp8_gemv; x in
                 bf16, autotuned tiles: what Fp8LinearMethod runs at decode sizes);
                 fp8-w8a16-block: the same with 128x128 block scales
  int4-triton    the earlier tiled Triton dequant-GEMM (kvyard.kernels.triton_ops.int4_gemm_tiled),
                 group 128; int4-mm: M > 16, int4_gemm's autotuned kernel over 64-row blocks (what
                 Int4LinearMethod runs at prefill sizes)
  int4-gemv      M <= 16: int4_gemm's autotuned GEMV (group 128 read by row; "config" names the
                 tuned tiling); int4-gemv-sN: N K-splits; int4-gemv-gidx: scales gathered through
                 g_idx (the GPTQ act-order path) on the same weights, M = 1
  (the int4 kernels read the layer's kernel layout, kvyard.layers.quantized_linear.int4_kernel_layout)
  int4-dequant   dequantize the int4 weight to bf16, then F.linear
and prints one JSON line per (shape, path): {"m", "k", "n", "path", "us", "graph_us", "tflops",
"vs_bf16", "rel_err"}: us are eager launches, graph_us the same call replayed from a CUDA graph
(10 calls a replay; what decode runs: no launch overhead; None where capture fails); rel_err
the relative L2 error against the float32 reference of the path's own quantization (fp8 and int4
paths; the GEMV rows also check that two runs are bit-identical: "deterministic").

    python benchmarks/quant_kernels.py [--m 1 16 64 1024] [--iters 50] [--gemv-splits 1 4 16]
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from kvyard.layers import quant_math as qm

SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]   # (K, N): qkv, o, gate_up, down


def timed(fn, iters: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return sorted(times)[len(times) // 2]


def timed_graph(fn, iters: int, calls: int = 10):
    """Median us per call of ``calls`` back-to-back calls captured in one CUDA graph."""
    from kvyard.executor.cuda_graph_runner import CudaGraphCapture

    graph = CudaGraphCapture(warmup_runs=1)
    graph.capture(lambda: [fn() for _ in range(calls)])
    return timed(graph.replay, iters) / calls


def paths(x: torch.Tensor, w: torch.Tensor, splits: list[int]):
    """{name: (fn, float32 reference or None)}."""
    from kvyard.kernels.triton_ops.fp8_block_gemm import fp8_block_gemm
    from kvyard.kernels.triton_ops.fp8_gemv import MAX_M, fp8_w8a16_gemv
    from kvyard.kernels.triton_ops.fp8_quant import per_token_fp8
    from kvyard.kernels.triton_ops.int4_gemm import int4_gemm, int4_gemm_tiled
    from kvyard.layers.quantized_linear import int4_kernel_layout

    wq8, sw8 = qm.fp8_per_row(w)
    sw8 = sw8.view(1, -1)
    wi8, swi8 = qm.int8_per_row(w)
    wi8_t, swi8 = wi8.t(), swi8.view(1, -1)
    q4, s4, z4 = qm.quantize_int4(w, 128, symmetric=True)
    qweight = qm.pack_int4_rows(q4.t().contiguous())
    s4, z4 = s4.t().contiguous().to(x.dtype), z4.t().contiguous().to(torch.uint8)
    g_idx = torch.arange(w.shape[1], dtype=torch.int32, device=w.device) // 128
    q4k = int4_kernel_layout(qweight, s4, z4)[0]      # what Int4LinearMethod stores
    xq8, sx8 = qm.fp8_per_row(x)
    wqb, swb = qm.fp8_per_token_group(w, 128)   # per-row block scales (the layer's storage form)

    def fp8_block():
        xq, sx = qm.fp8_per_token_group(x, 128)
        return fp8_block_gemm(xq, sx, wqb, swb, 128, x.dtype)

    def fp8():
        xq, sx = qm.fp8_per_row(x)
        return torch._scaled_mm(xq, wq8.t(), scale_a=sx, scale_b=sw8, out_dtype=x.dtype)

    def fp8_quant1():
        xq, sx = per_token_fp8(x)
        return torch._scaled_mm(xq, wq8.t(), scale_a=sx, scale_b=sw8, out_dtype=x.dtype)

    def int8():
        xq, sx = qm.int8_per_row(x)
        return (qm.int_mm(xq, wi8_t).float() * sx * swi8).to(x.dtype)

    ref8 = (xq8.float() @ wq8.float().t()) * sx8 * sw8
    ref_w16 = x.float() @ (wq8.float() * sw8.t()).t()                       # w8a16: x unquantized
    ref_w16b = x.float() @ qm.dequantize_block(wqb, swb, 128).t()
    ref4 = x.float() @ qm.dequantize_int4(qweight, s4, z4, g_idx, torch.float32).t()
    sw8_n = sw8.view(-1)
    out = {
        "bf16": (lambda: F.linear(x, w), None),
        "fp8-scaled_mm": (fp8, ref8),
        "fp8-quant1-scaled_mm": (fp8_quant1, ref8),
        "fp8-quant1": (lambda: per_token_fp8(x), None),
        "fp8-gemm-only": (lambda: torch._scaled_mm(xq8, wq8.t(), scale_a=sx8, scale_b=sw8, out_dtype=x.dtype), ref8),
        "fp8-dequant": (lambda: F.linear(x, (wq8.to(x.dtype) * sw8.t().to(x.dtype))), None),
        "fp8-block": (fp8_block, None),
        "int8": (int8, None),
        "int4-triton": (lambda: int4_gemm_tiled(x, q4k, s4, z4, g_idx), ref4),
        "int4-dequant": (lambda: F.linear(x, qm.dequantize_int4(qweight, s4, z4, g_idx, x.dtype)), None),
    }
    if x.shape[0] > MAX_M:
        out["int4-mm"] = (lambda: int4_gemm(x, q4k, s4, z4, g_idx, 128), ref4)
    if x.shape[0] <= MAX_M:
        out["fp8-w8a16"] = (lambda: fp8_w8a16_gemv(x, wq8, sw8_n), ref_w16)
        out["fp8-w8a16-block"] = (lambda: fp8_w8a16_gemv(x, wqb, swb, 128), ref_w16b)
        out["int4-gemv"] = (lambda: int4_gemm(x, q4k, s4, z4, g_idx, 128), ref4)
        if x.shape[0] == 1:   # its own compiles: batch 1 only
            out["int4-gemv-gidx"] = (lambda: int4_gemm(x, q4k, s4, z4, g_idx, 0), ref4)
        for sp in splits:
            out[f"int4-gemv-s{sp}"] = (lambda sp=sp: int4_gemm(x, q4k, s4, z4, g_idx, 128, split=sp), ref4)
    return out


def accuracy(name: str, fn, ref) -> dict:
    """rel_err against the float32 reference; GEMV rows: bit-identical across two runs."""
    if ref is None:
        return {}
    y = fn().float()
    row = {"rel_err": float(f"{((y - ref).norm() / ref.norm()).item():.3g}")}
    if "gemv" in name or "w8a16" in name:
        row["deterministic"] = bool(torch.equal(fn().float(), y))
    if name.startswith(("int4-gemv", "int4-mm")):   # the tiling the autotuner chose for this shape
        from kvyard.kernels.triton_ops.int4_gemm import _mm_tuned
        row["config"] = str(getattr(_mm_tuned, "best_config", None))
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--m", type=int, nargs="+", default=[1, 16, 64, 1024])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--gemv-splits", type=int, nargs="*", default=[1, 4, 16],
                        help="extra int4 GEMV rows with a forced split-K count (M <= 16)")
    args = parser.parse_args()
    torch.manual_seed(0)
    for k, n in SHAPES:
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        for m in args.m:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            base = None
            for name, (fn, ref) in paths(x, w, args.gemv_splits).items():
                try:
                    us = timed(fn, args.iters)
                    extra = accuracy(name, fn, ref)
                except Exception as exc:   # a path the device cannot run: say so, go on
                    print(json.dumps({"m": m, "k": k, "n": n, "path": name, "error": str(exc).splitlines()[0][:200]}))
                    continue
                try:
                    graph_us = round(timed_graph(fn, args.iters), 2)
                except Exception:          # not capturable (host syncs): eager figure only
                    graph_us = None
                base = (us, graph_us) if name == "bf16" else base
                print(json.dumps({"m": m, "k": k, "n": n, "path": name, "us": round(us, 2), "graph_us": graph_us,
                                  "tflops": round(2 * m * k * n / us / 1e6, 2),
                                  "vs_bf16": round(base[0] / us, 3) if base else None,
                                  "graph_vs_bf16": round(base[1] / graph_us, 3) if base and base[1] and graph_us else None,
                                  **extra}), flush=True)


if __name__ == "__main__":
    main()
