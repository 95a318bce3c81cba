"""Results of benchmarks/h100/run_benchmarks.sh: tag rows as they are produced, and print the
issue's targets table from them.

    python3 benchmarks/h100/summarize.py tag RESULTS ROWS_FILE key=value ...   append ROWS_FILE's
                                                                              JSON lines to RESULTS
                                                                              with the tags added
    python3 benchmarks/h100/summarize.py table RESULTS                        print the tables

Model FLOPs of a prefill (for the matmul-rate target) count the multiply-adds of every linear
layer once per token (2 FLOPs each) plus causal attention (QK^T and PV over the average of
(L+1)/2 keys per query); logits only for each request's last token.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

MATMUL_TFLOPS = 787.0     # bf16 dense matmul rate measured on the same kind of machine (docs/performance.md)
TARGETS = {
    "decode-8b": "≥ 180 tokens/s",
    "decode-smol": "≤ 1.0 ms/step",
    "offline-8b": "≥ 6,000 output tokens/s",
    "prefill-8b": "≥ 70% of 787 TFLOP/s",
}


def tag(results: str, rows_file: str, pairs: list[str]) -> None:
    tags = dict(p.split("=", 1) for p in pairs)
    path = Path(rows_file)
    if not path.exists():
        return
    with open(results, "a") as out:
        for line in path.read_text().splitlines():
            if line.strip():
                out.write(json.dumps({**json.loads(line), **tags}) + "\n")


def llama_prefill_flops(config: dict, batch: int, input_len: int) -> float:
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    linear = hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden + 3 * hidden * inter
    attention = 2 * heads * head_dim * (input_len + 1) / 2          # QK^T and PV per token, causal average
    per_token = 2 * layers * (linear + attention)
    logits = 2 * hidden * config["vocab_size"] * batch
    return per_token * batch * input_len + logits


def load(results: str) -> list[dict]:
    path = Path(results)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def measured(row: dict) -> tuple[str, float]:
    """(text, value) of the figure its workload's target is about."""
    workload = row["workload"]
    if workload == "decode-8b":
        return f"{row['decode_tok_s']:,.1f} tok/s ({row['decode_ms_step']:.2f} ms/step)", row["decode_tok_s"]
    if workload == "decode-smol":
        return f"{row['decode_ms_step']:.3f} ms/step", row["decode_ms_step"]
    if workload == "prefill-8b":
        config = json.loads(Path(row["model"], "config.json").read_text())
        tflops = llama_prefill_flops(config, row["batch"], row["input_len"]) / row["prefill_s"] / 1e12
        return (f"{tflops:,.0f} TFLOP/s = {100 * tflops / MATMUL_TFLOPS:.0f}% ({row['prefill_s']:.3f} s)",
                tflops / MATMUL_TFLOPS)
    return f"{row['output_tok_s']:,.0f} out tok/s ({row['prompts']} prompts)", row["output_tok_s"]


def meets(workload: str, value: float) -> bool:
    return {"decode-8b": value >= 180, "decode-smol": value <= 1.0, "offline-8b": value >= 6000,
            "prefill-8b": value >= 0.70}.get(workload, False)


def table(results: str) -> None:
    rows = load(results)
    print("\n== targets (H100, bf16, dummy weights) ==")
    print(f"{'workload':<12} {'attention':<13} {'target':<24} {'measured':<44} ok")
    for row in rows:
        if row.get("workload") in TARGETS and row.get("engine", "kvyard") == "kvyard":
            text, value = measured(row)
            print(f"{row['workload']:<12} {row.get('attention', '?'):<13} {TARGETS[row['workload']]:<24} "
                  f"{text:<44} {'yes' if meets(row['workload'], value) else 'NO'}")
    by_run = defaultdict(dict)
    for row in rows:
        if row.get("bench") == "offline" and row.get("compare") == "hf":
            by_run[(row["workload"], row.get("attention"))][row["engine"]] = row
    if by_run:
        print("\n== vs transformers in the same run (offline --compare-hf, output tokens/s) ==")
        print(f"{'workload':<22} {'attention':<13} {'kvyard':>12} {'transformers':>13} {'ratio':>7}")
        for (workload, attention), pair in by_run.items():
            if "kvyard" in pair and "transformers" in pair:
                k, h = pair["kvyard"]["output_tok_s"], pair["transformers"]["output_tok_s"]
                print(f"{workload:<22} {attention or '?':<13} {k:>12,.1f} {h:>13,.1f} {k / h:>7.2f}")


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "tag":
        tag(argv[1], argv[2], argv[3:])
        return 0
    if len(argv) == 2 and argv[0] == "table":
        table(argv[1])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
