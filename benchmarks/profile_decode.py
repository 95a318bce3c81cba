"""Where a decode step's time goes, on the in-process scheduler (as `kvyard bench one-batch`).

    python3 benchmarks/h100/profile_decode.py --model-path benchmarks/configs/llama-3.1-8b \
        --load-format dummy --dtype bfloat16 --attention-backend flashinfer --batch-size 1

After a prefill and WARMUP decode steps it profiles STEPS decode steps with torch.profiler and
prints, per step:
  wall       host clock around scheduler.step(), synchronized (what one-batch reports)
  kernels    summed duration of the GPU kernels (and memcpy/memset) the step ran
  gpu span   first kernel start to last kernel end: kernels plus the gaps between them
  idle       wall - gpu span: the GPU waiting for the host (scheduling, sampling, planning)
plus the kernels that take most of the time. gaps = gpu span - kernels is launch overhead
inside the step (small when the step replays a CUDA graph).
"""
from __future__ import annotations

import sys
import time
from dataclasses import replace

import torch
from torch.profiler import ProfilerActivity, profile

from kvyard.bench.common import random_prompts, sync_device
from kvyard.bench.one_batch import build_parser
from kvyard.cli.common import server_args_from

WARMUP, STEPS = 20, 50


def main(argv: list[str]) -> int:
    ns = build_parser().parse_args(argv)
    from kvyard.io_struct import TokenizedGenerateReq
    from kvyard.launch import resolve_args
    from kvyard.sampling.params import SamplingParams
    from kvyard.scheduler_process import build_scheduler

    bs = max(ns.batch_size)
    args = resolve_args(server_args_from(ns))
    args = replace(args, chunked_prefill_size=-1, skip_tokenizer_init=True, disable_radix_cache=True,
                   max_running_requests=max(args.max_running_requests or 0, bs),
                   max_total_tokens=args.max_total_tokens or bs * (ns.input_len + WARMUP + STEPS + 8) + 1024,
                   max_prefill_tokens=max(args.max_prefill_tokens, bs * ns.input_len))
    scheduler = build_scheduler(args)
    params = SamplingParams.from_dict({"max_new_tokens": WARMUP + STEPS + 4, "temperature": 0, "ignore_eos": True})
    params.verify(scheduler.vocab_size)
    params.normalize(None)
    for i, ids in enumerate(random_prompts(bs, ns.input_len, scheduler.vocab_size, ns.seed)):
        scheduler.add_request(TokenizedGenerateReq(f"profile-{i}", ids, params))
    for _ in range(1 + WARMUP):
        scheduler.step()
    sync_device()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(STEPS):
            scheduler.step()
        sync_device()
        wall_ms = 1000 * (time.perf_counter() - start) / STEPS
    report(prof, wall_ms, scheduler.runner.attn_backend_name, bs)
    return 0


def report(prof, wall_ms: float, attention: str, bs: int) -> None:
    device_events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels_ms = sum(e.device_time for e in device_events) / 1000 / STEPS
    if device_events:
        span_us = max(e.time_range.end for e in device_events) - min(e.time_range.start for e in device_events)
    else:
        span_us = 0
    span_ms = span_us / 1000 / STEPS
    print(f"\ndecode profile: attention {attention}, batch {bs}, {STEPS} steps")
    print(f"  wall {wall_ms:.3f} ms/step | kernels {kernels_ms:.3f} | gpu span {span_ms:.3f} "
          f"(gaps {span_ms - kernels_ms:.3f}) | idle {wall_ms - span_ms:.3f}")
    totals: dict[str, float] = {}
    for e in device_events:
        totals[e.name] = totals.get(e.name, 0.0) + e.device_time
    print("  top kernels (ms/step):")
    for name, us in sorted(totals.items(), key=lambda kv: -kv[1])[:12]:
        print(f"    {us / 1000 / STEPS:8.3f}  {name[:110]}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
