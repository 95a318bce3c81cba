"""`kvyard bench one-batch`: prefill latency and decode ms/step of one static batch, run on the
in-process scheduler (no HTTP, no IPC), one row per batch size. decode ms/step is the decode
phase's wall time over its output_len - 1 tokens per request."""
from __future__ import annotations

import time

import torch

from kvyard.bench.common import append_result, console, print_rows, random_prompts, sync_device
from kvyard.cli.common import engine_parser, run_reporting_errors, server_args_from


def build_parser():
    p = engine_parser("kvyard bench one-batch", __doc__, groups={"model", "scheduling", "runtime", "logging"})
    g = p.add_argument_group("benchmark")
    g.add_argument("--batch-size", type=int, nargs="+", default=[1])
    g.add_argument("--input-len", type=int, default=128)
    g.add_argument("--output-len", type=int, default=128)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--output-file", default=None, help="append one JSON line per batch size")
    return p


def main(argv: list[str]) -> int:
    ns = build_parser().parse_args(argv)
    return run_reporting_errors(lambda: run(ns))


def run(ns) -> int:
    from dataclasses import replace

    from kvyard.frontend.launch import resolve_args
    from kvyard.scheduler.process import build_scheduler

    args = resolve_args(server_args_from(ns))
    for name in ("dp_size", "tp_size", "pp_size"):
        if getattr(args, name) != 1:
            raise ValueError(f"{name}: not supported by bench one-batch (one scheduler runs in this process); "
                             "use bench offline, bench serving or benchmarks/cpu/tp_step_time.py")
    biggest = max(ns.batch_size) * (ns.input_len + ns.output_len)
    args = replace(args, chunked_prefill_size=-1, max_prefill_tokens=max(args.max_prefill_tokens, biggest),
                   skip_tokenizer_init=True,
                   max_running_requests=max(args.max_running_requests or 0, max(ns.batch_size)),
                   max_total_tokens=args.max_total_tokens or biggest + 1024, disable_radix_cache=True)
    with console.status("loading the model…"):
        scheduler = build_scheduler(args)
    runner = scheduler.runner
    rows = []
    for bs in ns.batch_size:  # warm-up at every size: compiled steps specialise per batch size
        _run_batch(scheduler, bs, 16, 4, ns.seed)
    for bs in ns.batch_size:
        prefill_s, decode_s = _run_batch(scheduler, bs, ns.input_len, ns.output_len, ns.seed)
        step_ms = 1000 * decode_s / max(1, ns.output_len - 1)
        rows.append({"batch": bs, "input_len": ns.input_len, "output_len": ns.output_len,
                     "prefill_s": prefill_s, "prefill_tok_s": bs * ns.input_len / prefill_s,
                     "decode_ms_step": step_ms, "decode_tok_s": bs * 1000 / step_ms if step_ms else 0.0,
                     "dtype": str(runner.dtype).replace("torch.", ""), "quantization": str(runner.quantization),
                     "threads": torch.get_num_threads()})
    print_rows(f"one batch: {args.model_path}", rows)
    for r in rows:
        append_result(ns.output_file, {"bench": "one-batch", "model": args.model_path, **r})
    return 0


def _run_batch(scheduler, bs: int, input_len: int, output_len: int, seed: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds). The decode phase is timed as a whole, steps back to
    back as the server runs them (with overlap scheduling the host prepares step N+1 while N
    computes), so decode seconds / (output_len - 1) is the per-token time a client sees."""
    from kvyard.scheduler.io_struct import TokenizedGenerateReq
    from kvyard.sampling.params import SamplingParams

    vocab = scheduler.vocab_size
    params = SamplingParams.from_dict({"max_new_tokens": output_len, "temperature": 0, "ignore_eos": True})
    params.verify(vocab)
    params.normalize(None)
    for i, ids in enumerate(random_prompts(bs, input_len, vocab, seed)):
        scheduler.add_request(TokenizedGenerateReq(f"bench-{bs}-{i}", ids, params))
    sync_device()
    start = time.perf_counter()
    scheduler.step()  # the whole batch prefills in one step (chunking is off)
    finish_inflight = getattr(scheduler, "finish_inflight", None)
    if finish_inflight is not None:  # overlap scheduling only launched it: wait for its tokens
        finish_inflight()
    sync_device()
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    while scheduler.has_work():
        scheduler.step()
    sync_device()
    return prefill_s, time.perf_counter() - start
