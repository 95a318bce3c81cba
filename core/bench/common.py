"""Pieces shared by the benchmarks: workload generation, result rows, the rich table."""
from __future__ import annotations

import json
import random
import time
from typing import Optional

from rich.console import Console
from rich.table import Table

console = Console(width=200)


def random_prompts(num: int, input_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Random token ids away from the low (often special) ids."""
    rng = random.Random(seed)
    lo, hi = min(100, vocab_size // 4), vocab_size - 1
    return [[rng.randrange(lo, hi) for _ in range(input_len)] for _ in range(num)]


def dataset_prompts(path: str, num: int) -> list[str]:
    prompts = []
    with open(path) as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                prompts.append(row.get("prompt") or row.get("text"))
            if len(prompts) >= num:
                break
    if not prompts:
        raise ValueError(f"dataset_path: {path} holds no prompts")
    return prompts


def append_result(path: Optional[str], row: dict) -> None:
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **row}) + "\n")


def print_rows(title: str, rows: list[dict]) -> None:
    if not rows:
        return
    table = Table(title=title)
    for key in rows[0]:
        table.add_column(key, justify="right")
    for row in rows:
        table.add_row(*(f"{v:,.2f}" if isinstance(v, float) else str(v) for v in row.values()))
    console.print(table)


def sync_device() -> None:
    """Wait for queued CUDA work, so a host clock read after it covers the device time too."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def hf_model_for(model_path: str, dtype, device: str = "cpu", load_format: str = "auto"):
    """transformers' model for the same model on ``device`` (a .gguf is dequantized by
    transformers). With load_format dummy (config.json only) it is built from the config with
    transformers' own random init: the same shapes, so the same speed."""
    import os

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_path.endswith(".gguf"):
        folder, name = os.path.split(model_path)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    elif load_format == "dummy":
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    return model.to(device).eval()


def hf_generate_tokens_per_s(model, prompts: list[list[int]], output_len: int) -> tuple[float, float]:
    """(output tokens/s, seconds) of transformers' batched greedy generate on equal-length prompts."""
    import torch

    ids = torch.tensor(prompts, device=model.device)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        model.generate(ids[:1, :8], attention_mask=mask[:1, :8], max_new_tokens=2, do_sample=False, pad_token_id=0)
        sync_device()
        start = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=output_len, min_new_tokens=output_len,
                       do_sample=False, pad_token_id=0)
        sync_device()
        elapsed = time.perf_counter() - start
    return len(prompts) * output_len / elapsed, elapsed
