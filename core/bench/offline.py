"""`kvyard bench offline`: output tokens/s of the full engine (scheduler, continuous batching,
radix cache) on N prompts; --compare-hf runs transformers' batched generate on the same inputs
in the same process, same dtype and threads, and prints the ratio."""
from __future__ import annotations

import time

import torch

from kvyard.bench.common import (append_result, console, dataset_prompts, hf_generate_tokens_per_s,
                                 hf_model_for, print_rows, random_prompts)
from kvyard.cli.common import engine_parser, run_reporting_errors, server_args_from


def build_parser():
    p = engine_parser("kvyard bench offline", __doc__, groups={"model", "scheduling", "runtime", "logging"})
    g = p.add_argument_group("benchmark")
    g.add_argument("--num-prompts", type=int, default=32)
    g.add_argument("--input-len", type=int, default=128)
    g.add_argument("--output-len", type=int, default=128)
    g.add_argument("--dataset-path", default=None, help="JSONL with a 'prompt' field per line")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--compare-hf", action="store_true", help="also time transformers generate")
    g.add_argument("--profile", action="store_true",
                   help="torch-profiler trace of the timed run's scheduler steps ($KVYARD_TORCH_PROFILER_DIR, default /tmp)")
    g.add_argument("--output-file", default=None, help="append one JSON line with the results")
    return p


def main(argv: list[str]) -> int:
    ns = build_parser().parse_args(argv)
    return run_reporting_errors(lambda: run(ns))


def run(ns) -> int:
    from kvyard.engine import Engine

    args = server_args_from(ns)
    with console.status("loading the model…"):
        engine = Engine(server_args=args)
    with engine:
        info = engine.get_server_info()
        params = {"max_new_tokens": ns.output_len, "temperature": 0, "ignore_eos": True}
        if ns.dataset_path:
            prompts = {"prompt": dataset_prompts(ns.dataset_path, ns.num_prompts)}
        else:
            prompts = {"input_ids": random_prompts(ns.num_prompts, ns.input_len, info["vocab_size"], ns.seed)}
        # warm-up at batch 1 and at a full batch: a torch.compile'd decode step compiles for the
        # first size and once more, shape-generic, for the second
        for n in (1, min(ns.num_prompts, 32)):
            engine.generate(input_ids=[[101 + i] * 8 for i in range(n)], sampling_params={"max_new_tokens": 4})
        engine.flush_cache()
        with console.status(f"running {ns.num_prompts} prompts…"):
            if ns.profile:
                engine.start_profile()
            start = time.perf_counter()
            outs = engine.generate(sampling_params=params, **prompts)
            elapsed = time.perf_counter() - start
            if ns.profile:
                console.print(f"profile trace: {engine.stop_profile()}", highlight=False)
        out_tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
        in_tokens = sum(o["meta_info"]["prompt_tokens"] for o in outs)
    row = {"engine": "kvyard", "dtype": info["dtype"], "quantization": str(info["quantization"]),
           "threads": torch.get_num_threads() if args.num_threads is None else args.num_threads,
           "prompts": ns.num_prompts, "seconds": elapsed, "output_tok_s": out_tokens / elapsed,
           "total_tok_s": (in_tokens + out_tokens) / elapsed}
    rows = [row]
    if ns.compare_hf and "input_ids" in prompts:
        rows.append(_hf_row(args.model_path or engine.server_args.model_path, info, prompts["input_ids"], ns,
                            device=args.resolved_device(), load_format=args.load_format))
        row["ratio_vs_hf"] = row["output_tok_s"] / rows[-1]["output_tok_s"]   # kvyard / transformers
        rows[-1]["ratio_vs_hf"] = 1.0
    print_rows(f"offline: {ns.num_prompts} prompts × {ns.input_len} in / {ns.output_len} out", rows)
    for r in rows:
        append_result(ns.output_file, {"bench": "offline", "model": engine.server_args.model_path,
                                       "input_len": ns.input_len, "output_len": ns.output_len, **r})
    return 0


def _hf_row(model_path: str, info: dict, prompts: list[list[int]], ns, device: str = "cpu",
            load_format: str = "auto") -> dict:
    """Runs after the engine has shut down, so on a GPU transformers gets its memory back."""
    dtype = getattr(torch, info["dtype"])
    with console.status("loading transformers…"):
        model = hf_model_for(model_path, dtype, device, load_format)
    with console.status("running transformers generate…"):
        tok_s, seconds = hf_generate_tokens_per_s(model, prompts, ns.output_len)
    in_tokens = len(prompts) * ns.input_len
    return {"engine": "transformers", "dtype": info["dtype"], "quantization": "None",
            "threads": torch.get_num_threads(), "prompts": len(prompts), "seconds": seconds,
            "output_tok_s": tok_s, "total_tok_s": (in_tokens + tok_s * seconds) / seconds}
