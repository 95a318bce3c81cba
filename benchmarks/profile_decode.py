"""Where a decode step's time goes, on the in-process scheduler (as `kvyard bench one-batch`).

    python benchmarks/profile_decode.py --batch-size 32 --input-len 128            # CPU, SmolLM2 GGUF
    python3 benchmarks/profile_decode.py --model-path benchmarks/configs/llama-3.1-8b \
        --load-format dummy --dtype bfloat16 --attention-backend flashinfer --batch-size 1

After the prefill (chunked as the flags say) and WARMUP decode steps it profiles STEPS decode
steps with torch.profiler and prints, per step:
  wall       host clock around scheduler.step(), synchronized (what one-batch reports)
  kernels    summed duration of the device kernels (and memcpy/memset) the step ran (CUDA only)
  gpu span   first kernel start to last kernel end over all steps, per step: kernels plus the
             gaps between them — inside a step (launches) and between steps (host work)
  idle       wall - gpu span
then the kernels (CUDA) or operators (CPU, self time) that take most of the time. With
--cprofile a second pass of STEPS steps runs under cProfile and prints the Python functions
with the most own time: the host side of a step (scheduler, runner prep, sampling, outputs).
"""
from __future__ import annotations

import cProfile
import pstats
import sys
import time
from dataclasses import replace

import torch
from torch.profiler import ProfilerActivity, profile

from kvyard.bench.common import random_prompts, sync_device
from kvyard.bench.one_batch import build_parser
from kvyard.cli.common import server_args_from

WARMUP, STEPS = 20, 50
HOST_WAIT_US = 20  # a gap between two kernels longer than this is the device waiting for the host


def main(argv: list[str]) -> int:
    parser = build_parser()
    parser.add_argument("--cprofile", action="store_true", help="also profile the host side with cProfile")
    ns = parser.parse_args(argv)
    scheduler = _scheduler_with_batch(ns)
    on_cuda = torch.cuda.is_available() and torch.device(scheduler.runner.device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        wall_ms = _timed_steps(scheduler)
    report(prof, wall_ms, scheduler.runner.attn_backend_name, max(ns.batch_size), on_cuda)
    if ns.cprofile:
        host = cProfile.Profile()
        host.enable()
        wall_ms = _timed_steps(scheduler)
        host.disable()
        print(f"\nhost profile (cProfile, {STEPS} steps, {wall_ms:.3f} ms/step with cProfile on):")
        pstats.Stats(host).sort_stats("tottime").print_stats(25)
    close = getattr(scheduler, "close", None)      # the overlap worker thread, if any
    if close is not None:
        close()
    return 0


def _scheduler_with_batch(ns):
    """A scheduler whose running batch is ns.batch_size requests past prefill and WARMUP steps."""
    from kvyard.scheduler.io_struct import TokenizedGenerateReq
    from kvyard.frontend.launch import resolve_args
    from kvyard.sampling.params import SamplingParams
    from kvyard.scheduler.process import build_scheduler

    bs = max(ns.batch_size)
    steps = WARMUP + 2 * STEPS + 4
    args = resolve_args(server_args_from(ns))
    # num_continuous_decode_steps 1: one decode step per scheduler.step(), which is what is timed
    args = replace(args, skip_tokenizer_init=True, disable_radix_cache=True, num_continuous_decode_steps=1,
                   max_running_requests=max(args.max_running_requests or 0, bs),
                   max_total_tokens=args.max_total_tokens or bs * (ns.input_len + steps + 8) + 1024)
    scheduler = build_scheduler(args)
    params = SamplingParams.from_dict({"max_new_tokens": steps, "temperature": 0, "ignore_eos": True})
    params.verify(scheduler.vocab_size)
    params.normalize(None)
    reqs = [TokenizedGenerateReq(f"profile-{i}", ids, params)
            for i, ids in enumerate(random_prompts(bs, ns.input_len, scheduler.vocab_size, ns.seed))]
    for req in reqs:
        scheduler.add_request(req)
    while len(scheduler.running) < bs or any(not r.output_ids for r in scheduler.running):
        scheduler.step()
    for _ in range(WARMUP):
        scheduler.step()
    return scheduler


def _timed_steps(scheduler) -> float:
    sync_device()
    start = time.perf_counter()
    for _ in range(STEPS):
        scheduler.step()
    sync_device()
    return 1000 * (time.perf_counter() - start) / STEPS


def report(prof, wall_ms: float, attention: str, bs: int, on_cuda: bool) -> None:
    print(f"\ndecode profile: attention {attention}, batch {bs}, {STEPS} steps")
    if not on_cuda:
        print(f"  wall {wall_ms:.3f} ms/step")
        print("  top operators by self CPU time (ms/step):")
        rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:20]
        for e in rows:
            print(f"    {e.self_cpu_time_total / 1000 / STEPS:8.3f}  {e.count // STEPS:5d}x  {e.key[:100]}")
        return
    device_events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels_ms = sum(e.device_time for e in device_events) / 1000 / STEPS
    if device_events:
        span_us = max(e.time_range.end for e in device_events) - min(e.time_range.start for e in device_events)
    else:
        span_us = 0
    span_ms = span_us / 1000 / STEPS
    print(f"  wall {wall_ms:.3f} ms/step | kernels {kernels_ms:.3f} | gpu span {span_ms:.3f} "
          f"(gaps {span_ms - kernels_ms:.3f}) | idle {wall_ms - span_ms:.3f}")
    _report_gaps(device_events)
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    for e in device_events:
        totals[e.name] = totals.get(e.name, 0.0) + e.device_time
        counts[e.name] = counts.get(e.name, 0) + 1
    print("  top kernels (ms/step, launches/step):")
    for name, us in sorted(totals.items(), key=lambda kv: -kv[1])[:16]:
        print(f"    {us / 1000 / STEPS:8.3f} {counts[name] / STEPS:5.0f}x  {name[:100]}")


def _report_gaps(device_events) -> None:
    """Splits the idle GPU time between kernels: short gaps are launch gaps (inside a CUDA graph
    or back-to-back launches), long ones are the device waiting for the host."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in device_events)
    short_us = long_us = 0.0
    for (_, prev_end), (start, _) in zip(spans, spans[1:]):
        gap = max(0.0, start - prev_end)
        if gap < HOST_WAIT_US:
            short_us += gap
        else:
            long_us += gap
    print(f"  {len(spans) / STEPS:.0f} kernels/step | launch gaps (< {HOST_WAIT_US} us each) "
          f"{short_us / 1000 / STEPS:.3f} ms/step | host waits {long_us / 1000 / STEPS:.3f} ms/step")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
