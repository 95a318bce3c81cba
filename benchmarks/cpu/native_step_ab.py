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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from decode_loop_ab import compare, in_process_scheduler  # noqa: E402

from kvyard.bench.one_batch import build_parser  # noqa: E402


def main(argv: list[str]) -> int:
    p = build_parser()
    p.add_argument("--block", type=int, default=8, help="decode steps per alternation block")
    ns = p.parse_args(argv)
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

    def use(label: str) -> None:
        loop.native_max = native_max if label == "native" else 0

    return compare(scheduler, ns, use, ("native", "loop"))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
