"""`kvyard bench serving`: load an HTTP server with streaming requests and measure it.

Modelled on SGLang's bench_serving. Works against `kvyard serve` (--backend kvyard: native
/generate) or any OpenAI-compatible server (--backend openai: /v1/completions). Prompts are
random token ids (lengths drawn from [ratio*len, len]), sent as ids so no tokenizer is needed,
or (--dataset-name sharegpt) the first human turn of each conversation of a ShareGPT-format
JSON file given by --dataset-path, with the reply's token count (or --sharegpt-output-len) as
the output length; arrivals are Poisson at --request-rate (inf: all at once), at most --max-concurrency in flight.
--profile brackets the run with /start_profile and /stop_profile (a torch-profiler trace of the
server's scheduler, written to its $KVYARD_TORCH_PROFILER_DIR). Reports request throughput, input/output tokens/s, and TTFT, TPOT, ITL and end-to-end latency
(mean, median, p99) in a table; --output-file appends one JSON line.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from kvyard.bench.common import append_result, console
from kvyard.cli.common import OneLineParser, run_reporting_errors


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="kvyard bench serving", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("kvyard", "openai"), default="kvyard",
                   help="kvyard: native /generate; openai: /v1/completions of any OpenAI-compatible server")
    p.add_argument("--base-url", default="http://127.0.0.1:30000")
    p.add_argument("--model", default=None, help="model name for --backend openai (default: the server's first)")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--dataset-name", choices=("random", "sharegpt"), default="random")
    p.add_argument("--dataset-path", default=None, help="ShareGPT-format JSON file (--dataset-name sharegpt); never downloaded")
    p.add_argument("--sharegpt-output-len", type=int, default=None,
                   help="output length of every ShareGPT request (default: the reply's token count)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder for ShareGPT lengths (default: the server's, from /get_model_info)")
    p.add_argument("--profile", action="store_true", help="profile the server's scheduler during the run")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--random-input-len", type=int, default=128)
    p.add_argument("--random-output-len", type=int, default=64)
    p.add_argument("--random-range-ratio", type=float, default=1.0,
                   help="lengths are drawn uniformly from [ratio*len, len]; 1.0 = exactly len")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="token ids are drawn below this (default: the kvyard server's vocab size)")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf = all at once")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    p.add_argument("--disable-ignore-eos", action="store_true", help="let requests stop at EOS")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--output-file", default=None, help="append one JSON line with the results")
    return p


def main(argv: list[str]) -> int:
    ns = build_parser().parse_args(argv)
    return run_reporting_errors(lambda: asyncio.run(run(ns)))


# -- workload ------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchRequest:
    prompt_ids: Optional[list[int]]
    output_len: int
    prompt_text: Optional[str] = None   # ShareGPT: sent as text
    prompt_len: int = 0


def random_requests(ns, vocab_size: int) -> list[BenchRequest]:
    rng = random.Random(ns.seed)
    lo = min(100, vocab_size // 4)  # keep away from the low, often special, ids

    def length(full: int) -> int:
        return rng.randint(max(1, int(full * ns.random_range_ratio)), full)

    return [BenchRequest([rng.randrange(lo, vocab_size) for _ in range(length(ns.random_input_len))],
                         length(ns.random_output_len)) for _ in range(ns.num_prompts)]


async def arrivals(n: int, rate: float, seed: int):
    """Yields 0..n-1 spaced by exponential gaps (a Poisson process at ``rate``/s)."""
    rng = random.Random(seed)
    for i in range(n):
        yield i
        if rate != float("inf"):
            await asyncio.sleep(rng.expovariate(rate))


SHAREGPT_MIN_LEN, SHAREGPT_MAX_PROMPT, SHAREGPT_MAX_TOTAL = 4, 1024, 2048


def sharegpt_requests(ns, tokenizer) -> list[BenchRequest]:
    """First human turn and the reply's length of each usable conversation, shuffled by --seed;
    conversations too short or too long to make a fair request are skipped."""
    with open(ns.dataset_path) as fh:
        data = json.load(fh)
    if not isinstance(data, list):
        raise ValueError(f"dataset_path: {ns.dataset_path} must hold a JSON list of conversations")
    pairs = [(c["conversations"][0]["value"], c["conversations"][1]["value"]) for c in data
             if isinstance(c, dict) and len(c.get("conversations") or []) >= 2]
    random.Random(ns.seed).shuffle(pairs)
    out = []
    for prompt, reply in pairs:
        n_in = len(tokenizer.encode(prompt))
        n_out = ns.sharegpt_output_len or len(tokenizer.encode(reply))
        if n_in < SHAREGPT_MIN_LEN or n_out < SHAREGPT_MIN_LEN or n_in > SHAREGPT_MAX_PROMPT \
                or n_in + n_out > SHAREGPT_MAX_TOTAL:
            continue
        out.append(BenchRequest(None, n_out, prompt, n_in))
        if len(out) == ns.num_prompts:
            break
    if not out:
        raise ValueError(f"dataset_path: no usable conversation in {ns.dataset_path}")
    return out


def check_args(ns) -> None:
    if ns.dataset_name == "sharegpt" and not ns.dataset_path:
        raise ValueError("dataset_path: --dataset-name sharegpt needs a ShareGPT JSON file (it is never downloaded)")
    if ns.sharegpt_output_len is not None and ns.sharegpt_output_len < 1:
        raise ValueError(f"sharegpt_output_len must be >= 1, got {ns.sharegpt_output_len}")
    for name in ("num_prompts", "random_input_len", "random_output_len"):
        if getattr(ns, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(ns, name)}")
    if not 0 < ns.random_range_ratio <= 1:
        raise ValueError(f"random_range_ratio must be in (0, 1], got {ns.random_range_ratio}")
    if ns.request_rate <= 0:
        raise ValueError(f"request_rate must be > 0, got {ns.request_rate}")
    if ns.max_concurrency is not None and ns.max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {ns.max_concurrency}")


# -- one request ---------------------------------------------------------------------------
@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)   # gaps between streamed chunks


def request_body(ns, req: BenchRequest, model: Optional[str]) -> tuple[str, dict]:
    ignore_eos = not ns.disable_ignore_eos
    prompt = req.prompt_text if req.prompt_text is not None else req.prompt_ids
    if ns.backend == "kvyard":
        return "/generate", {"text" if req.prompt_text is not None else "input_ids": prompt, "stream": True,
                             "sampling_params": {"max_new_tokens": req.output_len, "temperature": 0,
                                                 "ignore_eos": ignore_eos}}
    return "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": req.output_len,
                               "temperature": 0, "stream": True, "ignore_eos": ignore_eos,
                               "stream_options": {"include_usage": True}}


async def send(client, ns, req: BenchRequest, model: Optional[str]) -> RequestResult:
    path, body = request_body(ns, req, model)
    result = RequestResult(prompt_tokens=req.prompt_len or len(req.prompt_ids or []))
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", path, json=body) as resp:
            if resp.status_code != 200:
                result.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode()[:200]}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    result.error = str(event["error"].get("message", event["error"]))
                    return result
                if _count_tokens(ns.backend, event, result):
                    now = time.perf_counter()
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
        result.e2e = time.perf_counter() - start
        result.ok = result.output_tokens > 0
        result.error = "" if result.ok else "no output tokens"
    except Exception as exc:  # a failed request is counted, not fatal
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def _count_tokens(backend: str, event: dict, result: RequestResult) -> bool:
    """Updates token counts from one event; True when it carried new output."""
    if backend == "kvyard":
        meta = event.get("meta_info", {})
        n = len(event.get("output_ids", []))
        result.prompt_tokens = meta.get("prompt_tokens", result.prompt_tokens)
        new = n > result.output_tokens
        result.output_tokens = max(result.output_tokens, n)
        return new
    if event.get("usage"):
        result.prompt_tokens = event["usage"].get("prompt_tokens", result.prompt_tokens)
        result.output_tokens = event["usage"].get("completion_tokens", result.output_tokens)
    choices = event.get("choices") or []
    if choices and choices[0].get("text"):
        if not event.get("usage"):
            result.output_tokens += 1  # one chunk per token unless usage says otherwise
        return True
    return False


# -- the run -------------------------------------------------------------------------------
async def run(ns) -> int:
    try:
        import httpx
    except ImportError:
        raise ValueError("backend: kvyard bench serving needs httpx (pip install httpx)") from None

    check_args(ns)
    headers = {"Authorization": f"Bearer {ns.api_key}"} if ns.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=ns.base_url.rstrip("/"), headers=headers, timeout=None,
                                 limits=limits) as client:
        model, vocab = await _server_facts(client, ns)
        reqs = sharegpt_requests(ns, await _tokenizer(client, ns)) if ns.dataset_name == "sharegpt" \
            else random_requests(ns, vocab)
        gate = asyncio.Semaphore(ns.max_concurrency or len(reqs))

        async def one(req: BenchRequest) -> RequestResult:
            async with gate:
                return await send(client, ns, req, model)

        with console.status(f"{len(reqs)} requests to {ns.base_url}…"):
            if ns.profile:
                await _profile_call(client, "/start_profile")
            start = time.perf_counter()
            tasks = [asyncio.ensure_future(one(reqs[i]))
                     async for i in arrivals(len(reqs), ns.request_rate, ns.seed)]
            results = await asyncio.gather(*tasks)
            duration = time.perf_counter() - start
            if ns.profile:
                await _profile_call(client, "/stop_profile")
    summary = summarize(results, duration)
    _print(ns, summary)
    append_result(ns.output_file, {"bench": "serving", "backend": ns.backend, "base_url": ns.base_url,
                                   "model": model, "num_prompts": ns.num_prompts, "dataset_name": ns.dataset_name,
                                   "random_input_len": ns.random_input_len, "random_output_len": ns.random_output_len,
                                   "random_range_ratio": ns.random_range_ratio, "request_rate": ns.request_rate,
                                   "max_concurrency": ns.max_concurrency, **summary})
    return 0 if summary["completed"] else 1


async def _profile_call(client, path: str) -> None:
    r = await client.post(path)
    if r.status_code != 200:
        raise ValueError(f"profile: {path} answered HTTP {r.status_code}: {r.text[:200]}")
    console.print(r.text.strip(), highlight=False)


async def _tokenizer(client, ns):
    """The tokenizer that counts ShareGPT lengths: --tokenizer, else the server's own folder."""
    from kvyard.model.tokenizer import load_tokenizer

    path = ns.tokenizer
    if path is None:
        r = await client.get("/get_model_info")
        if r.status_code != 200:
            raise ValueError("tokenizer: the server has no /get_model_info; pass --tokenizer")
        path = r.json()["tokenizer_path"]
    return load_tokenizer(path)


async def _server_facts(client, ns) -> tuple[Optional[str], int]:
    """(model name, vocab size) from the server where the flags leave them open."""
    model, vocab = ns.model, ns.vocab_size
    if ns.backend == "openai" and model is None:
        r = await client.get("/v1/models")
        r.raise_for_status()
        model = r.json()["data"][0]["id"]
    if vocab is None:
        r = await client.get("/get_server_info")
        if r.status_code != 200:
            raise ValueError("vocab_size: the server has no /get_server_info; pass --vocab-size")
        vocab = int(r.json()["vocab_size"])
    return model, vocab


def _stats(values: list[float], name: str) -> dict:
    ms = np.asarray(values or [0.0]) * 1000
    return {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
            f"p99_{name}_ms": float(np.percentile(ms, 99))}


def summarize(results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    inp = sum(r.prompt_tokens for r in ok)
    out = sum(r.output_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    errors = sorted({r.error for r in results if not r.ok})
    return {"completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
            "total_input_tokens": inp, "total_output_tokens": out,
            "request_throughput": len(ok) / duration, "input_throughput": inp / duration,
            "output_throughput": out / duration, "total_throughput": (inp + out) / duration,
            "concurrency": sum(r.e2e for r in ok) / duration,
            **_stats([r.ttft for r in ok], "ttft"), **_stats(tpot, "tpot"),
            **_stats([g for r in ok for g in r.itl], "itl"), **_stats([r.e2e for r in ok], "e2e_latency"),
            "errors": errors[:5]}


def _print(ns, s: dict) -> None:
    from rich.table import Table

    table = Table(title=f"serving benchmark: {ns.backend} @ {ns.base_url}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in s.items():
        if key != "errors":
            table.add_row(key, f"{value:,.2f}" if isinstance(value, float) else str(value))
    console.print(table)
    for e in s["errors"]:
        console.print(f"[red]failed request:[/] {e}", highlight=False)
