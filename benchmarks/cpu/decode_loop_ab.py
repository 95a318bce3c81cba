"""The C++ decode loop against the Python decode step, A/B in one process on one batch.

    OMP_NUM_THREADS=1 python benchmarks/cpu/decode_loop_ab.py --batch-size 1 --input-len 128 \
        --output-len 256 --num-threads 1 --block 8

The in-process scheduler (as `kvyard bench one-batch`) prefills one batch, then runs its decode
steps in blocks of BLOCK steps, alternating the C++ decode loop (the default) and the Python step
(the runner's decode path switched off for the block), so both see the same KV lengths and the
same machine load. Per path it prints the median and spread of ms per step, wall clock and this
process's CPU time (with one thread, CPU time is what a step costs when the machine is shared:
the time other processes hold the core is not counted). First it generates 24 greedy tokens
for the same prompts through each path alone and says whether they are equal.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

from kvyard.bench.common import random_prompts
from kvyard.bench.one_batch import build_parser
from kvyard.cli.common import server_args_from


def main(argv: list[str]) -> int:
    p = build_parser()
    p.add_argument("--block", type=int, default=8, help="decode steps per alternation block")
    ns = p.parse_args(argv)
    bs = ns.batch_size[0]
    ns.num_continuous_decode_steps = 1   # one decode step per scheduler.step(): blocks count steps
    scheduler = in_process_scheduler(ns)
    runner = scheduler.runner
    loop = runner.decode_graphs
    if loop is None:
        print("the C++ decode loop is off for this model/flags: nothing to compare")
        return 1

    def use(label: str) -> None:
        runner.decode_graphs = loop if label == "loop" else None

    return compare(scheduler, ns, use, ("loop", "python"))


def compare(scheduler, ns, use, labels: tuple[str, str]) -> int:
    """Generates the same greedy tokens through each path alone and says whether they are equal,
    then times the paths in alternating blocks (``timed_blocks``) and prints both."""
    from kvyard.sampling.params import SamplingParams
    from kvyard.scheduler.io_struct import TokenizedGenerateReq

    bs, runner = ns.batch_size[0], scheduler.runner
    tokens = {}
    for label in labels:
        use(label)
        tokens[label] = _generate(scheduler, bs, ns, SamplingParams, TokenizedGenerateReq, f"eq-{label}")
    print(f"greedy tokens equal across paths: {tokens[labels[0]] == tokens[labels[1]]}")
    times = timed_blocks(scheduler, ns, use, labels)
    print(f"batch {bs}, {ns.input_len} in / {ns.output_len} out, {torch.get_num_threads()} threads, "
          f"dtype {runner.dtype}, quantization {runner.quantization}")
    print_times(times)
    return 0


def timed_blocks(scheduler, ns, use, labels: tuple[str, str]) -> dict[str, list[tuple[float, float]]]:
    """Prefills ns.batch_size[0] requests of ns.input_len tokens, then runs their decode steps in
    blocks of ns.block, ``use(label)`` before each block, labels alternating; (wall, cpu) seconds
    of each step per label. Ends with ``use(labels[0])``."""
    from kvyard.sampling.params import SamplingParams
    from kvyard.scheduler.io_struct import TokenizedGenerateReq

    params = _params(SamplingParams, ns.output_len, scheduler.vocab_size)
    for i, ids in enumerate(random_prompts(ns.batch_size[0], ns.input_len, scheduler.vocab_size, ns.seed)):
        scheduler.add_request(TokenizedGenerateReq(f"ab-{i}", ids, params))
    scheduler.step()   # prefill
    times = {label: [] for label in labels}
    turn = 0
    while scheduler.has_work():
        label = labels[turn % 2]
        use(label)
        for _ in range(ns.block):
            if not scheduler.has_work():
                break
            w, c = time.perf_counter(), time.process_time()
            scheduler.step()
            times[label].append((time.perf_counter() - w, time.process_time() - c))
        turn += 1
    use(labels[0])
    return times


def print_times(times: dict[str, list[tuple[float, float]]]) -> None:
    for label, rows in times.items():
        wall = sorted(1000 * w for w, _ in rows)
        cpu = sorted(1000 * c for _, c in rows)
        print(f"{label:7s} steps {len(rows):4d}  wall ms/step median {statistics.median(wall):7.2f} "
              f"(p10 {wall[len(wall) // 10]:.2f}, p90 {wall[9 * len(wall) // 10]:.2f})  "
              f"cpu ms/step median {statistics.median(cpu):7.2f} (p10 {cpu[len(cpu) // 10]:.2f}, "
              f"p90 {cpu[9 * len(cpu) // 10]:.2f})")


def in_process_scheduler(ns):
    """The Scheduler of `kvyard bench one-batch`'s arguments ``ns``, in this process, sized for
    one batch of ns.batch_size[0] requests (no chunking, no prefix cache, no tokenizer)."""
    from dataclasses import replace

    from kvyard.frontend.launch import resolve_args
    from kvyard.scheduler.process import build_scheduler

    bs = ns.batch_size[0]
    args = resolve_args(server_args_from(ns))
    args = replace(args, chunked_prefill_size=-1, skip_tokenizer_init=True, disable_radix_cache=True,
                   max_running_requests=max(bs, args.max_running_requests or 0),
                   max_total_tokens=args.max_total_tokens or bs * (ns.input_len + ns.output_len) + 1024)
    return build_scheduler(args)


def _params(SamplingParams, n: int, vocab: int):
    params = SamplingParams.from_dict({"max_new_tokens": n, "temperature": 0, "ignore_eos": True})
    params.verify(vocab)
    params.normalize(None)
    return params


def _generate(scheduler, bs, ns, SamplingParams, TokenizedGenerateReq, tag) -> list[list[int]]:
    reqs = []
    for i, ids in enumerate(random_prompts(bs, 32, scheduler.vocab_size, ns.seed + 1)):
        req = TokenizedGenerateReq(f"{tag}-{i}", ids, _params(SamplingParams, 24, scheduler.vocab_size))
        scheduler.add_request(req)
        reqs.append(req.rid)
    out = {rid: [] for rid in reqs}
    while scheduler.has_work():
        for update in scheduler.step():
            out[update.rid].extend(update.new_token_ids)
    return [out[rid] for rid in reqs]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
