"""The decode step's layers alone: the native step against the dispatcher loop, and what running
the LM head (or just streaming 28 MB) between two steps costs them.

    OMP_NUM_THREADS=2 python benchmarks/cpu/native_step_isolated.py --batch-size 1 --num-threads 2

Builds the in-process scheduler of `kvyard bench one-batch`'s arguments (no prefill), points a
batch of B sequences of CONTEXT cached tokens at the pool, and times ``plan.step`` (all layers,
the final norm; no embedding, no logits) of the native plan and of the dispatcher plan, ROUNDS
alternating rounds of ITERS calls each: alone, with the model's logits computed between two
steps, and with a 28 MB copy between two steps (about the Q8_0 LM head's bytes). Prints medians.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from decode_loop_ab import in_process_scheduler  # noqa: E402

from kvyard.bench.one_batch import build_parser  # noqa: E402

CONTEXT, ROUNDS, ITERS = 129, 2, 200


def main(argv: list[str]) -> int:
    ns = build_parser().parse_args(argv)
    ns.output_len = 8
    runner = in_process_scheduler(ns).runner
    loop = runner.decode_graphs
    if loop is None or loop.native is None:
        print("the native decode step is off for this model/flags: nothing to compare")
        return 1
    b = ns.batch_size[0]
    table = runner.req_to_token.table
    for i in range(b):   # sequence i: rows 1 + i, slots 1 + 300 i ...
        table[1 + i, :CONTEXT] = torch.arange(CONTEXT, dtype=torch.int32) + 1 + 300 * i
    args = (torch.randn(b, loop.lowered.norm.weight.shape[0]).to(runner.dtype),
            *loop.lowered.rotary.lookup(torch.full((b,), CONTEXT - 1)),
            torch.tensor([CONTEXT + 300 * i for i in range(b)]), table, torch.arange(1, b + 1),
            torch.full((b,), CONTEXT))
    hidden = args[0].clone()
    big = torch.zeros(28 << 20, dtype=torch.uint8)
    copy = torch.empty_like(big)
    between = {"alone": lambda: None, "logits between": lambda: runner.model.compute_logits(hidden),
               "28 MB copy between": lambda: copy.copy_(big)}
    print(f"batch {b}, {CONTEXT} cached tokens, {torch.get_num_threads()} threads, dtype {runner.dtype}")
    for _ in range(ROUNDS):
        for label, fn in between.items():
            row = []
            for name, plan in (("native", loop.native), ("loop", loop.plan)):
                row.append(f"{name} {_median_ms(plan, args, fn):6.3f}")
            print(f"  {label:20s} ms/step: " + "  ".join(row), flush=True)
    return 0


def _median_ms(plan, args, between) -> float:
    times = []
    for i in range(ITERS + 20):
        t = time.perf_counter()
        plan.step(*args)
        if i >= 20:
            times.append(time.perf_counter() - t)
        between()
    return 1000 * statistics.median(times)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
