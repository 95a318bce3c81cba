"""The fused-experts Triton kernel against the torch path (kvyard.layers.moe), CUDA, bfloat16.

    python benchmarks/moe_kernel_bench.py [--tokens 1 16 256 4096] [--json out.jsonl]

Per model shape (experts E, top-k, hidden H, expert intermediate I) and token count T: the time
of one routed-experts call (median of CUDA-event timings after warm-up; the torch path includes
its host sync) and the kernel's max relative difference from the torch path run in float32.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

from kvyard.layers.moe import RoutingConfig, fused_experts_torch, select_experts
from kvyard.kernels.triton_ops.fused_moe import fused_experts

SHAPES = {  # name: (experts, top_k, hidden, moe intermediate)
    "olmoe-1b-7b": (64, 8, 2048, 1024),
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "deepseek-v2-lite": (64, 6, 2048, 1408),
}


def time_ms(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256, 4096])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    print(f"{'shape':18} {'T':>5} {'torch ms':>9} {'triton ms':>9} {'speedup':>8} {'max rel diff':>12}")
    for name, (experts, top_k, hidden, inter) in SHAPES.items():
        gen = torch.Generator(device="cuda").manual_seed(0)
        w13 = (torch.randn(experts, 2 * inter, hidden, device="cuda", generator=gen) * 0.02).bfloat16()
        w2 = (torch.randn(experts, hidden, inter, device="cuda", generator=gen) * 0.02).bfloat16()
        for t in args.tokens:
            x = torch.randn(t, hidden, device="cuda", generator=gen).bfloat16()
            weights, ids = select_experts(torch.randn(t, experts, device="cuda", generator=gen),
                                          RoutingConfig(experts, top_k, renormalize=True))
            torch_ms = time_ms(lambda: fused_experts_torch(x, w13, w2, weights, ids))
            triton_ms = time_ms(lambda: fused_experts(x, w13, w2, weights, ids))
            ref = fused_experts_torch(x.float(), w13.float(), w2.float(), weights, ids)
            diff = ((fused_experts(x, w13, w2, weights, ids).float() - ref).abs().max() / ref.abs().max()).item()
            row = dict(shape=name, tokens=t, torch_ms=torch_ms, triton_ms=triton_ms, max_rel_diff=diff,
                       device=torch.cuda.get_device_name())
            rows.append(row)
            print(f"{name:18} {t:>5} {torch_ms:>9.3f} {triton_ms:>9.3f} {torch_ms / triton_ms:>7.2f}x {diff:>12.2e}")
    if args.json:
        with open(args.json, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
