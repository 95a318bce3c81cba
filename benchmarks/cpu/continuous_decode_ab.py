"""Continuous decode on vs off, A/B in one process (the in-process scheduler, as `kvyard bench
one-batch`): whole generations alternate between --num-continuous-decode-steps N and 1.

    OMP_NUM_THREADS=2 python benchmarks/cpu/continuous_decode_ab.py --batch-size 1 \
        --input-len 128 --output-len 128 --num-threads 2 --rounds 6

Each round generates OUTPUT_LEN greedy tokens for the same prompts once with runs of up to N
steps and once with single steps (the order flips every round), and records the decode phase's
wall ms per token and this process's CPU ms per token (user + system of all its threads: what a
step costs when other processes hold the cores). It prints the median and the spread (min–max) of
each, the 1-minute load average at each round, and whether the two settings' tokens are equal.
The scheduler's config is swapped between generations (dataclasses.replace), nothing else.
"""
from __future__ import annotations

import os
import statistics
import sys
import time


def main(argv: list[str]) -> int:
    from kvyard.bench.one_batch import build_parser
    p = build_parser()
    p.add_argument("--rounds", type=int, default=6, help="generations per setting")
    p.add_argument("--steps", type=int, default=8, help="N of the 'on' setting")
    ns = p.parse_args(argv)
    scheduler, prompts, params = _setup(ns)
    base = scheduler.config
    from dataclasses import replace
    settings = {"on": replace(base, num_continuous_decode_steps=ns.steps),
                "off": replace(base, num_continuous_decode_steps=1)}
    figures = {name: {"wall": [], "cpu": []} for name in settings}
    tokens, loads = {}, []
    for rnd in range(ns.rounds + 1):                       # round 0 warms up and is not counted
        order = ("on", "off") if rnd % 2 else ("off", "on")
        for name in order:
            scheduler.config = settings[name]
            out, wall, cpu = _generate(scheduler, prompts, params, f"{name}{rnd}")
            tokens.setdefault(name, out)
            if rnd:
                figures[name]["wall"].append(wall)
                figures[name]["cpu"].append(cpu)
        loads.append(os.getloadavg()[0])
    print(f"greedy tokens equal on/off: {tokens['on'] == tokens['off']}")
    print(f"load average (1 min) per round: {' '.join(f'{x:.1f}' for x in loads)}")
    for name, fig in figures.items():
        print(f"{name:>3}: decode wall ms/token median {statistics.median(fig['wall']):.2f} "
              f"(min {min(fig['wall']):.2f} max {max(fig['wall']):.2f}), CPU ms/token median "
              f"{statistics.median(fig['cpu']):.2f} (min {min(fig['cpu']):.2f} max {max(fig['cpu']):.2f}), "
              f"{len(fig['wall'])} generations")
    return 0


def _setup(ns):
    from decode_loop_ab import in_process_scheduler   # benchmarks/cpu/ is this script's folder

    from kvyard.bench.common import random_prompts
    from kvyard.sampling.params import SamplingParams

    scheduler = in_process_scheduler(ns)
    params = SamplingParams.from_dict({"max_new_tokens": ns.output_len, "temperature": 0, "ignore_eos": True})
    params.verify(scheduler.vocab_size)
    params.normalize(None)
    return scheduler, random_prompts(ns.batch_size[0], ns.input_len, scheduler.vocab_size, ns.seed), params


def _generate(scheduler, prompts, params, tag: str):
    """(tokens per request, decode wall ms per token, decode CPU ms per token)."""
    from kvyard.scheduler.io_struct import TokenizedGenerateReq

    for i, ids in enumerate(prompts):
        scheduler.add_request(TokenizedGenerateReq(f"{tag}-{i}", ids, params))
    out: dict[str, list[int]] = {}
    for u in scheduler.step():                              # the prefill (its first token)
        out.setdefault(u.rid, []).extend(u.new_token_ids)
    wall, cpu = time.perf_counter(), time.process_time()
    while scheduler.has_work():
        for u in scheduler.step():
            out.setdefault(u.rid, []).extend(u.new_token_ids)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    steps = params.max_new_tokens - 1
    return [out[f"{tag}-{i}"] for i in range(len(prompts))], 1000 * wall / steps, 1000 * cpu / steps


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
