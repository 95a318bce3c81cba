"""kvyard beside transformers on the same model config, several workloads, one load of each.

For every config folder given (dummy weights from its config.json): one kvyard Engine runs every
workload, shuts down (its scheduler process returns the device memory), then transformers builds
the model from the same config on the same device and dtype and runs the same workloads with its
batched greedy generate. A workload is PROMPTSxINPUT/OUTPUT (e.g. 1x128/256, 64x256/128);
prompts are random token ids of equal length and every request generates exactly OUTPUT tokens
(ignore_eos / min_new_tokens), so both engines do the same work. One JSON line per (model,
workload, engine) goes to --json as soon as it is measured, so a run cut short keeps its rows.

    python benchmarks/models_vs_hf.py benchmarks/configs/gemma-2-9b benchmarks/configs/olmoe-1b-7b \
        --workloads 1x128/256 64x256/128 --attention-backend triton --json /tmp/models.jsonl

Output tokens/s for kvyard are wall-clock over Engine.generate of the whole workload (prefill
included); a batch-1 workload's figure is therefore a little below the pure decode rate.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time

import torch

from kvyard.bench.common import hf_generate_tokens_per_s, hf_model_for, random_prompts


def parse_workload(text: str) -> tuple[int, int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)/(\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"workload {text!r}: expected PROMPTSxINPUT/OUTPUT, e.g. 1x128/256")
    return int(m[1]), int(m[2]), int(m[3])


def emit(path: str | None, row: dict) -> None:
    print(json.dumps(row), flush=True)
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps(row) + "\n")


def run_kvyard(config: str, workloads, ns) -> tuple[dict, dict]:
    """{workload: output tok/s} and the server info (vocab size, dtype) of one Engine."""
    from kvyard import Engine

    kwargs = dict(model_path=config, load_format="dummy", dtype=ns.dtype, skip_tokenizer_init=True,
                  attention_backend=ns.attention_backend, context_length=ns.context_length,
                  log_level="warning")
    if ns.device:
        kwargs["device"] = ns.device
    rates = {}
    with Engine(**kwargs) as engine:
        info = engine.get_server_info()
        engine.generate(input_ids=[[101 + i] * 8 for i in range(4)], sampling_params={"max_new_tokens": 4})
        for w in workloads:
            n, inp, out = w
            prompts = random_prompts(n, inp, info["vocab_size"], ns.seed)
            engine.flush_cache()
            start = time.perf_counter()
            outs = engine.generate(input_ids=prompts, sampling_params={"max_new_tokens": out, "temperature": 0,
                                                                        "ignore_eos": True})
            seconds = time.perf_counter() - start
            rates[w] = sum(o["meta_info"]["completion_tokens"] for o in outs) / seconds
            emit(ns.json, {"model": config, "workload": f"{n}x{inp}/{out}", "engine": "kvyard",
                           "output_tok_s": round(rates[w], 2), "seconds": round(seconds, 3)})
    return rates, info


def run_hf(config: str, workloads, info: dict, rates: dict, ns) -> None:
    device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = hf_model_for(config, getattr(torch, info["dtype"]), device, "dummy")
    for w in workloads:
        n, inp, out = w
        prompts = random_prompts(n, inp, info["vocab_size"], ns.seed)
        tok_s, seconds = hf_generate_tokens_per_s(model, prompts, out)
        emit(ns.json, {"model": config, "workload": f"{n}x{inp}/{out}", "engine": "transformers",
                       "output_tok_s": round(tok_s, 2), "seconds": round(seconds, 3),
                       "kvyard_vs_hf": round(rates[w] / tok_s, 2)})
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", help="model config folders (config.json; weights are dummy)")
    p.add_argument("--workloads", nargs="+", type=parse_workload, default=[(1, 128, 256), (64, 256, 128)])
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default=None)
    p.add_argument("--context-length", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-hf", action="store_true", help="kvyard only")
    p.add_argument("--json", default=None, help="append one JSON line per measurement")
    ns = p.parse_args(argv)
    failed = 0
    for config in ns.configs:
        try:
            rates, info = run_kvyard(config, ns.workloads, ns)
            if not ns.skip_hf:
                run_hf(config, ns.workloads, info, rates, ns)
        except Exception as e:   # one model's failure must not cost the others' rows
            failed += 1
            print(f"{config}: FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            emit(ns.json, {"model": config, "error": f"{type(e).__name__}: {e}"[:300]})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
