"""Per-output-token cost of constrained decoding: a batch of B requests decoded with and
without a JSON-schema constraint, through the in-process Scheduler (no HTTP, no IPC).

The schema asks for a long array of objects, so no constrained request finishes early: both runs
decode the same batch size for the same number of steps, and the difference is the grammar's
cost (filling the bitmask, unpacking it on the device, masking the logits, advancing matchers).
Prefill is excluded; each mode is measured ``--repeats`` times, alternating, and the best run is
kept (the machine may be shared).

    python benchmarks/grammar_overhead.py                         # SmolLM2 (float32), xgrammar, B=16
    python benchmarks/grammar_overhead.py --grammar-backend outlines --dtype auto
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from kvyard.scheduler.io_struct import TokenizedGenerateReq
from kvyard.frontend.launch import resolve_args, tokenizer_factory
from kvyard.sampling.params import SamplingParams
from kvyard.scheduler.process import build_scheduler
from kvyard.server_args import ServerArgs

SCHEMA = {"type": "array", "minItems": 200, "items": {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "role": {"enum": ["admin", "user", "guest"]}}, "required": ["name", "age", "role"]}}
PROMPT = [{"role": "user", "content": "List the users of our web shop as a JSON array."}]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--grammar-backend", default="xgrammar")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-threads", type=int, default=None, help="torch CPU threads (default: physical cores)")
    return parser.parse_args()


def run_once(scheduler, prompt_ids: list[int], constrained: bool, batch: int, output_len: int, tag: str) -> dict:
    """Decode-phase seconds and output tokens of one batch, plus time spent in the grammar."""
    extra = {"json_schema": json.dumps(SCHEMA)} if constrained else {"ignore_eos": True}
    for i in range(batch):
        params = SamplingParams.from_dict({"max_new_tokens": output_len, "temperature": 1.0, **extra})
        params.verify(scheduler.vocab_size)
        scheduler.add_request(TokenizedGenerateReq(f"{tag}-{i}", prompt_ids, params.normalize(None),
                                                   sampling_seed=i))
    _time_grammar(scheduler)
    grammar_before = getattr(scheduler.grammar, "seconds", 0.0)
    decode_s, tokens, finished_early = 0.0, 0, 0
    while scheduler.has_work():
        decoding = not scheduler.waiting and scheduler.chunked_req is None and scheduler.running
        before = scheduler.stats["generation_tokens"]
        start = time.perf_counter()
        updates = scheduler.step()
        if decoding:
            decode_s += time.perf_counter() - start
            tokens += scheduler.stats["generation_tokens"] - before
        finished_early += sum(1 for u in updates if u.finished_reason and u.finished_reason["type"] != "length")
    grammar_s = getattr(scheduler.grammar, "seconds", 0.0) - grammar_before
    return {"decode_s": decode_s, "tokens": tokens, "grammar_s": grammar_s, "finished_early": finished_early}


def _time_grammar(scheduler) -> None:
    """Wraps the grammar's per-step calls once; their seconds add up in ``grammar.seconds``."""
    grammar = scheduler.grammar
    if grammar is None or hasattr(grammar, "seconds"):
        return
    grammar.seconds = 0.0
    for name in ("apply_masks", "after_token"):
        inner = getattr(grammar, name)

        def timed(*args, _inner=inner):
            start = time.perf_counter()
            try:
                return _inner(*args)
            finally:
                grammar.seconds += time.perf_counter() - start
        setattr(grammar, name, timed)


def main() -> None:
    args = parse_args()
    server_args = resolve_args(ServerArgs(model_path=args.model_path, dtype=args.dtype,
                                          grammar_backend=args.grammar_backend, num_threads=args.num_threads,
                                          log_level="warning"))
    factory = tokenizer_factory(server_args)
    scheduler = build_scheduler(server_args, factory)
    tokenizer = factory()
    encoded = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_dict=False)
    prompt_ids = list(encoded["input_ids"] if isinstance(encoded, dict) else encoded)
    run_once(scheduler, prompt_ids, True, 2, 4, "warmup-c")    # compiles and caches the grammar
    run_once(scheduler, prompt_ids, False, 2, 4, "warmup-u")
    best: dict[bool, dict] = {}
    for r in range(args.repeats):
        for constrained in (False, True):
            res = run_once(scheduler, prompt_ids, constrained, args.batch_size, args.output_len, f"{r}-{constrained}")
            per_token = res["decode_s"] / max(res["tokens"], 1)
            print(f"repeat {r} {'json_schema ' if constrained else 'unconstrained'}: "
                  f"{per_token * 1e3:.2f} ms/token ({res['tokens']} tokens, grammar {res['grammar_s']:.2f} s, "
                  f"finished early {res['finished_early']})")
            if constrained not in best or per_token < best[constrained]["per_token"]:
                best[constrained] = {**res, "per_token": per_token}
    free, json_ = best[False]["per_token"], best[True]["per_token"]
    print(f"\nbatch {args.batch_size}, {args.output_len} output tokens each, backend {args.grammar_backend}, "
          f"dtype {args.dtype}, {torch.get_num_threads()} torch threads")
    print(f"unconstrained: {free * 1e3:.2f} ms per output token")
    print(f"json_schema:   {json_ * 1e3:.2f} ms per output token "
          f"({(json_ / free - 1) * 100:+.1f}%; grammar work {best[True]['grammar_s'] / max(best[True]['tokens'], 1) * 1e3:.2f} ms/token)")
    if scheduler.grammar is not None:
        scheduler.grammar.close()


if __name__ == "__main__":
    main()
