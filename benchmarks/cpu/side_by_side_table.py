"""The markdown table of one `benchmarks/cpu/side_by_side.sh` run, from the files it wrote.

    python benchmarks/cpu/side_by_side_table.py [OUT]       (default /tmp/kvyard_cpu_bench)

Reads OUT/results.jsonl (kvyard's benchmarks, the serving runs and the resident-memory and
load lines the script adds), OUT/llama-bench.jsonl and OUT/batched-bench.jsonl (llama.cpp's own
JSONL output). A figure whose part did not run is "—". Each row names the 1-minute load average
at the start of the part that measured it (the machine may be shared).
"""
from __future__ import annotations

import json
import os
import sys

SERVING_PORTS = {"31240": "kvyard", "31241": "llama-server"}   # part_serving's servers


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    rows = []
    for line in open(path):
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def fmt(x, digits: int = 1) -> str:
    return "—" if x is None else f"{x:,.{digits}f}"


def ratio(a, b) -> str:
    return "—" if a is None or not b else f"{a / b:.2f}×"


def pick(rows: list[dict], **match):
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return found[-1] if found else None


def main(out: str) -> int:
    res = read_jsonl(os.path.join(out, "results.jsonl"))
    bench = read_jsonl(os.path.join(out, "llama-bench.jsonl"))
    batched = read_jsonl(os.path.join(out, "batched-bench.jsonl"))
    load = {r["part"]: r["load"] for r in res if r.get("bench") == "load"}
    one = {r["batch"]: r for r in res if r.get("bench") == "one-batch"}
    offline = pick(res, bench="offline", engine="kvyard")
    hf = pick(res, bench="offline", engine="transformers")
    tg = next((r for r in bench if r.get("n_gen", 0) > 0), None)
    pp = next((r for r in bench if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0), None)
    bb = batched[-1] if batched else None
    serve = {SERVING_PORTS[r["base_url"].rsplit(":", 1)[-1]]: r for r in res
             if r.get("bench") == "serving" and r.get("base_url", "").rsplit(":", 1)[-1] in SERVING_PORTS}
    mem = {r["engine"]: r for r in res if r.get("bench") == "memory"}

    def get(row, key):
        return None if row is None else row.get(key)

    b1, b32 = one.get(1), one.get(32)
    bb_out = None if bb is None else bb["pl"] * bb["tg"] / bb["t"]   # output tokens over the whole run
    rows = [
        ("batch 1, 128 in / 128 out, decode tok/s", "≥ 1.2× llama.cpp", get(b1, "decode_tok_s"),
         get(tg, "avg_ts"), f" ± {get(tg, 'stddev_ts'):.1f} (llama-bench tg)" if tg else "", "one-batch"),
        ("batch 1 prefill, 128 tokens, tok/s", "—", get(b1, "prefill_tok_s"), get(pp, "avg_ts"),
         f" ± {get(pp, 'stddev_ts'):.1f} (llama-bench pp)" if pp else "", "one-batch"),
        ("offline 32 × 128 / 128, output tok/s end to end", "no worse than before", get(offline, "output_tok_s"),
         bb_out, " (llama-batched-bench: 32 × 128 output tokens over its T)" if bb else "", "offline"),
        ("decode phase at batch 32, tok/s", "no worse than before", get(b32, "decode_tok_s"), get(bb, "speed_tg"),
         " (batched-bench S_TG)" if bb else "", "one-batch"),
        ("prefill 32 × 128 tokens, tok/s", "—", get(b32, "prefill_tok_s"), get(bb, "speed_pp"),
         " (batched-bench S_PP)" if bb else "", "one-batch"),
        ("serving, 128 requests × 128 / 128, rate inf: output tok/s", "no worse than before",
         get(serve.get("kvyard"), "output_throughput"), get(serve.get("llama-server"), "output_throughput"),
         " (llama-server -np 32)" if "llama-server" in serve else "", "serving"),
        ("serving: median TTFT, ms", "—", get(serve.get("kvyard"), "median_ttft_ms"),
         get(serve.get("llama-server"), "median_ttft_ms"), "", "serving"),
        ("resident memory, idle server, default KV budget, MiB", "≤ 1.5× llama-server",
         get(mem.get("kvyard"), "rss_mib"), get(mem.get("llama-server"), "rss_mib"),
         f" (llama-server -c {mem['llama-server'].get('context')})" if "llama-server" in mem else "", "memory"),
    ]
    print("| workload | goal | kvyard | llama.cpp (same run) | kvyard / llama.cpp | load at start |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, goal, ours, theirs, note, part in rows:
        print(f"| {name} | {goal} | {fmt(ours)} | {fmt(theirs)}{note} | {ratio(ours, theirs)} "
              f"| {load.get(part, '—')} |")
    if hf is not None:
        print(f"\ntransformers generate on the offline prompts (same process): {fmt(hf['output_tok_s'])} output tok/s "
              f"(kvyard {ratio(get(offline, 'output_tok_s'), hf['output_tok_s'])})")
    for engine, r in mem.items():
        print(f"\n{engine} resident memory: {r['rss_mib']} MiB idle ({r.get('detail', '')})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", "/tmp/kvyard_cpu_bench")))
