"""The native decode step against the dispatcher decode loop, A/B in one process on one batch.

    OMP_NUM_THREADS=2 python benchmarks/cpu/native_step_ab.py --batch-size 1 --input-len 128 \
        --output-len 256 --num-threads 2 --block 8

As decode_loop_ab.py: the in-process scheduler prefills one batch, then runs its decode steps in
blocks of BLOCK steps, alternating the native step (one OpenMP region per step; the default up
to NATIVE_MAX_ROWS rows) and the C++ loop's dispatcher path (the native plan switched off for the
block), so both see the same KV lengths and machine load. Per path: median and spread of ms per
step, wall clock and this process's CPU time. First it generates 24 greedy tokens for the same
prompts through each path alone and says whether they are equal.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import kvyard  # noqa: F401  first: it sets the OpenMP wait policy before torch loads libgomp
import torch

sys.path.insert(0, str(Path(__file__).parent))
from decode_loop_ab import _generate, _params, in_process_scheduler  # noqa: E402

from kvyard.bench.one_batch import build_parser  # noqa: E402


def main(argv: list[str]) -> int:
    p = build_parser()
    p.add_argument("--block", type=int, default=8, help="decode steps per alternation block")
    ns = p.parse_args(argv)
    from kvyard.sampling.params import SamplingParams
    from kvyard.scheduler.io_struct import TokenizedGenerateReq

    bs = ns.batch_size[0]
    ns.num_continuous_decode_steps = 1
    scheduler = in_process_scheduler(ns)
    loop = scheduler.runner.decode_graphs
    if loop is None or getattr(loop, "native", None) is None:
        print("the native decode step is off for this model/flags: nothing to compare")
        return 1
    native_max = loop.native_max
    if bs > native_max:
        print(f"batch {bs} is above the native step's {native_max} rows: nothing to compare")
        return 1
    tokens = {}
    for label in ("native", "loop"):
        loop.native_max = native_max if label == "native" else 0
        tokens[label] = _generate(scheduler, bs, ns, SamplingParams, TokenizedGenerateReq, f"eq-{label}")
    print(f"greedy tokens equal across paths: {tokens['native'] == tokens['loop']}")
    params = _params(SamplingParams, ns.output_len, scheduler.vocab_size)
    from kvyard.bench.common import random_prompts
    for i, ids in enumerate(random_prompts(bs, ns.input_len, scheduler.vocab_size, ns.seed)):
        scheduler.add_request(TokenizedGenerateReq(f"ab-{i}", ids, params))
    scheduler.step()   # prefill
    times = {"native": [], "loop": []}
    native = True
    while scheduler.has_work():
        label = "native" if native else "loop"
        loop.native_max = native_max if native else 0
        for _ in range(ns.block):
            if not scheduler.has_work():
                break
            w, c = time.perf_counter(), time.process_time()
            scheduler.step()
            times[label].append((time.perf_counter() - w, time.process_time() - c))
        native = not native
    loop.native_max = native_max
    print(f"batch {bs}, {ns.input_len} in / {ns.output_len} out, {torch.get_num_threads()} threads, "
          f"dtype {scheduler.runner.dtype}, quantization {scheduler.runner.quantization}")
    for label, rows in times.items():
        wall = sorted(1000 * w for w, _ in rows)
        cpu = sorted(1000 * c for _, c in rows)
        print(f"{label:7s} steps {len(rows):4d}  wall ms/step median {statistics.median(wall):7.2f} "
              f"(p10 {wall[len(wall) // 10]:.2f}, p90 {wall[9 * len(wall) // 10]:.2f})  "
              f"cpu ms/step median {statistics.median(cpu):7.2f} (p10 {cpu[len(cpu) // 10]:.2f}, "
              f"p90 {cpu[9 * len(cpu) // 10]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
