"""The frontend language's prefix sharing, measured: a batch of programs with a shared few-shot
prefix and two forks each, run with kvyard.lang's run_batch against a kvyard server, compared
with the same prompts sent as independent chat requests.

Each program: system(few-shot prefix of about --prefix-tokens tokens) + user(question), then two
forks that answer in different styles (assistant turn opened with a style cue). The chat mode
sends, per program and fork, the same conversation to /v1/chat/completions (the style cue as a
final assistant message continued, SGLang's continue_final_message), all at once on a thread
pool of the same size. Before each mode the radix cache is flushed; the server's own counters
(/get_server_info prompt_tokens, cached_tokens) give the prompt tokens sent and computed.

    python benchmarks/lang_prefix.py                  # starts a server (kvyard.lang.Runtime)
    python benchmarks/lang_prefix.py --url http://127.0.0.1:30000 --api-key KEY --programs 64
"""
from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

import kvyard.lang as sgl

STYLES = ["Short answer:", "In one sentence:"]
SHOTS = [("What is the boiling point of water at sea level?", "100 degrees Celsius."),
         ("Who wrote Romeo and Juliet?", "William Shakespeare."),
         ("What is the largest ocean on Earth?", "The Pacific Ocean."),
         ("How many legs does a spider have?", "Eight."),
         ("What gas do plants absorb from the air?", "Carbon dioxide."),
         ("What is the square root of 81?", "Nine."),
         ("Which planet is known as the red planet?", "Mars."),
         ("What is the chemical symbol for gold?", "Au."),
         ("In which continent is Kenya?", "Africa."),
         ("What is the freezing point of water in Fahrenheit?", "32 degrees Fahrenheit.")]
TOPICS = ["France", "Japan", "Brazil", "Canada", "Egypt", "India", "Norway", "Mexico", "Kenya", "Chile",
          "Spain", "Italy", "Peru", "Ghana", "Nepal", "Cuba"]


def fewshot_prefix(tokens: int) -> str:
    """Q/A pairs repeated to about ``tokens`` tokens (SmolLM2's tokenizer: about 3.1 characters a token)."""
    lines, i = ["Answer the question like these examples."], 0
    while len("\n".join(lines)) < tokens * 3.1:
        q, a = SHOTS[i % len(SHOTS)]
        lines.append(f"Example {i + 1}. Q: {q} A: {a}")
        i += 1
    return "\n".join(lines)


def questions(n: int) -> list[str]:
    kinds = ["What is the capital of {}?", "What language is spoken in {}?", "What currency does {} use?",
             "Name a famous dish from {}."]
    return [kinds[i % len(kinds)].format(TOPICS[(i // len(kinds)) % len(TOPICS)]) + f" (#{i})" for i in range(n)]


def make_program(prefix: str, max_tokens: int):
    @sgl.function
    def answer_twice(s, question):
        s += sgl.system(prefix)
        s += sgl.user(question)
        forks = s.fork(2)
        for style, f in zip(STYLES, forks):
            f += sgl.assistant_begin() + style + sgl.gen("answer", max_tokens=max_tokens, stop="\n")
        forks.join()
    return answer_twice


def server_counters(client: httpx.Client) -> dict:
    info = client.get("/get_server_info").json()
    return {"prompt_tokens": info["prompt_tokens"], "cached_tokens": info["cached_tokens"]}


def measure(client: httpx.Client, run) -> dict:
    client.post("/flush_cache").raise_for_status()
    before = server_counters(client)
    start = time.perf_counter()
    requests = run()
    elapsed = time.perf_counter() - start
    after = server_counters(client)
    sent = after["prompt_tokens"] - before["prompt_tokens"]
    cached = after["cached_tokens"] - before["cached_tokens"]
    return {"seconds": round(elapsed, 2), "requests": requests, "prompt_tokens_sent": sent,
            "prompt_tokens_computed": sent - cached, "cached_share": round(cached / sent, 3) if sent else 0.0}


def run_lang(backend, program, qs: list[str], threads: int) -> int:
    states = program.run_batch([{"question": q} for q in qs], backend=backend, temperature=0, num_threads=threads)
    for s in states:
        if s.error() is not None:
            raise s.error()
    return len(qs) * 3 + 1  # per program: the fork hint and two answers; plus the batch's prefix hint


def run_chat(client: httpx.Client, model: str, prefix: str, qs: list[str], max_tokens: int, threads: int) -> int:
    def one(q_style):
        q, style = q_style
        body = {"model": model, "temperature": 0, "max_tokens": max_tokens, "stop": ["\n"],
                "continue_final_message": True,
                "messages": [{"role": "system", "content": prefix}, {"role": "user", "content": q},
                             {"role": "assistant", "content": style}]}
        client.post("/v1/chat/completions", json=body).raise_for_status()
    jobs = [(q, style) for q in qs for style in STYLES]
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, jobs))
    return len(jobs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", help="a running kvyard server; default: start one")
    ap.add_argument("--api-key")
    ap.add_argument("--model-path", help="for the server this script starts (default: SmolLM2)")
    ap.add_argument("--programs", type=int, default=64)
    ap.add_argument("--prefix-tokens", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=64)
    ap.add_argument("--max-total-tokens", type=int, default=16384)
    args = ap.parse_args()

    runtime = None
    if args.url is None:
        from kvyard.model.source import default_model_path
        runtime = sgl.Runtime(model_path=args.model_path or default_model_path(), dtype="float32",
                              max_total_tokens=args.max_total_tokens, api_key=args.api_key)
        backend, url = runtime, runtime.base_url
    else:
        backend, url = sgl.RuntimeEndpoint(args.url, api_key=args.api_key), args.url
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    client = httpx.Client(base_url=url, headers=headers, timeout=3600,
                          limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))
    try:
        prefix = fewshot_prefix(args.prefix_tokens)
        prefix_tokens = backend.cache_prefix(prefix)["prompt_tokens"]
        model = client.get("/v1/models").json()["data"][0]["id"]
        program = make_program(prefix, args.max_tokens)
        qs = questions(args.programs)
        lang = measure(client, lambda: run_lang(backend, program, qs, args.threads))
        chat = measure(client, lambda: run_chat(client, model, prefix, qs, args.max_tokens, args.threads))
        print(json.dumps({"programs": args.programs, "forks": 2, "prefix_tokens": prefix_tokens,
                          "max_tokens": args.max_tokens, "threads": args.threads,
                          "run_batch": lang, "independent_chat": chat}, indent=2))
    finally:
        client.close()
        backend.shutdown()


if __name__ == "__main__":
    main()
