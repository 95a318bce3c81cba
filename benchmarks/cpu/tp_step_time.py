"""Decode step time on the CPU: --tp-size 2 (two gloo ranks, one thread each) against one rank
(two threads), at batch 1 and batch 32 — the same two cores either way.

    python benchmarks/cpu/tp_step_time.py [--config benchmarks/configs/llama-3.2-1b]
                                          [--override JSON] [--rounds 3] [--batches 1 32]

Dummy weights (float32) from a config folder with --override merged into it (default: Llama-3.2-1B's
widths cut to 4 decoder layers and a 32768-token vocabulary: ~375M parameters, 1.5 GB in float32,
so both engines fit a shared 24 GB box). Both engines are
started once and stay up; each round measures every (tp, batch) pair in turn, alternating the
engines (the box is shared and noisy). A decode step's time is measured as the difference
between a long and a short generation of the same batch (--long vs --short new tokens, greedy,
ignore_eos) divided by the extra steps, so prefill and start-up cancel out. Prints the median
and min-max over rounds per configuration, and checks the two engines' greedy outputs are equal.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time


def step_time(engine, batch: int, short: int, long: int, prompt_len: int) -> tuple[float, list]:
    rng = random.Random(batch)
    ids = [[rng.randrange(10, 30000) for _ in range(prompt_len)] for _ in range(batch)]
    times = {}
    for n in (short, long):
        engine.flush_cache()
        started = time.perf_counter()
        outs = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": n, "temperature": 0.0,
                                                               "ignore_eos": True})
        times[n] = time.perf_counter() - started
    return (times[long] - times[short]) / (long - short), [o["output_ids"] for o in outs]


def main() -> None:
    from kvyard import Engine

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="benchmarks/configs/llama-3.2-1b")
    ap.add_argument("--override", default=json.dumps({"num_hidden_layers": 4, "vocab_size": 32768,
                                                      "tie_word_embeddings": False}))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--short", type=int, default=4)
    ap.add_argument("--long", type=int, default=12)
    ap.add_argument("--prompt-len", type=int, default=32)
    a = ap.parse_args()
    common = dict(model_path=a.config, load_format="dummy", dtype="float32", skip_tokenizer_init=True,
                  max_total_tokens=4096, attention_backend="torch_native", log_level="warning",
                  json_model_override_args=a.override, watchdog_timeout=1800)
    engines = {1: Engine(**common, num_threads=2), 2: Engine(**common, tp_size=2, num_threads=1)}
    samples: dict[tuple[int, int], list[float]] = {(tp, b): [] for tp in engines for b in a.batches}
    try:
        for _ in range(a.rounds):
            for b in a.batches:
                outputs = {}
                for tp, engine in engines.items():
                    t, outputs[tp] = step_time(engine, b, a.short, a.long, a.prompt_len)
                    samples[(tp, b)].append(t)
                    print(f"tp={tp} batch={b}: {t * 1e3:.1f} ms/step", flush=True)
                assert outputs[1] == outputs[2], f"batch {b}: TP=2 output differs from TP=1"
    finally:
        for engine in engines.values():
            engine.shutdown()
    print(f"{a.config} with {a.override} (dummy float32), decode step time, {a.rounds} alternating rounds")
    print("| batch | TP=1 (2 threads) median [min-max] ms | TP=2 (1 thread/rank) median [min-max] ms | TP=2 / TP=1 |")
    print("| ---: | ---: | ---: | ---: |")
    for b in a.batches:
        one, two = (sorted(samples[(tp, b)]) for tp in (1, 2))
        m1, m2 = statistics.median(one), statistics.median(two)
        print(f"| {b} | {m1 * 1e3:.1f} [{one[0] * 1e3:.1f}-{one[-1] * 1e3:.1f}] | "
              f"{m2 * 1e3:.1f} [{two[0] * 1e3:.1f}-{two[-1] * 1e3:.1f}] | {m2 / m1:.2f} |")


if __name__ == "__main__":
    main()
