"""Batch-1 decode with and without speculative decoding, on the in-process scheduler.

    python benchmarks/speculative_cpu.py [--model-path M] [--rounds 3] [--max-new-tokens 160] [--ignore-eos]
        [--dtype auto|float32]
        [--llama-lookup auto|off|PATH] [--ngram-steps 4] [--ngram-min-match 1]
        [--standalone-steps 1 2 3 4 5]

Workloads: copy-heavy prompts (repeat, rewrite and spell-fix a given passage, a code edit; each
answer ends at its end-of-sequence token unless --ignore-eos) for NGRAM (chains
of --ngram-steps drafts, default 4, and a trie of 9 nodes over up to 4 continuations, depth 4), and
STANDALONE with the target as its own draft (acceptance 1: the machinery's upper bound) at
num_steps 1..5. Runs alternate plain / speculative per round (noisy shared cores); prints
tokens/s per configuration (median over rounds, with min-max), acceptance, and checks that every
speculative output equals the plain output token for token.

Beside them, in the same run and on the same prompts (chat-templated text, greedy, the same
GGUF and thread count): llama.cpp's prompt-lookup decoding, ``llama-lookup --spec-draft-n-max 4`` (its
n-gram drafts from the context), when a build exists: ``auto`` looks in the llama.cpp peer's build
folder (benchmarks/peers/llamacpp.sh; add the binary with
``cmake --build ~/.cache/kvyard/llamacpp/build --target llama-lookup``).
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import tempfile
import time

LOOKUP_BIN = os.path.expanduser("~/.cache/kvyard/llamacpp/build/bin/llama-lookup")


def _has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as fh:
            return "amx_tile" in fh.read()
    except OSError:
        return False


# As in benchmarks/cpu/side_by_side.sh: on AMX CPUs llama.cpp's repacked weights crash a forward of
# more than one row (the lookup's verify batches), so its tools run without repacking there.
NO_REPACK = ["--no-repack"] if _has_amx() else []

PASSAGE = ("The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a lamp, "
           "a notebook and a flask of tea. From the gallery he watched the ships pass the reef, wrote "
           "down their names and the hour, and trimmed the wick so that the light would burn steady "
           "until dawn. In winter the wind howled around the tower and the salt crusted the windows, "
           "but the keeper never missed a night.")
CODE = ("def total_price(items, tax_rate):\n    subtotal = 0\n    for item in items:\n"
        "        subtotal += item.price * item.quantity\n    tax = subtotal * tax_rate\n"
        "    return subtotal + tax\n")
PROMPTS = [
    f"Repeat the following passage exactly, word for word:\n\n{PASSAGE}",
    f"Rewrite this passage replacing 'keeper' with 'guardian', changing nothing else:\n\n{PASSAGE}",
    f"Rename the variable `subtotal` to `net` in this function and print the whole function:\n\n{CODE}",
    "Fix the spelling mistakes in this passage and return the full passage:\n\n"
    + PASSAGE.replace("climbed", "climbd").replace("ships", "shipps").replace("steady", "stedy"),
]


def run_once(model_path: str, prompts: list[list[int]], max_new: int, dtype: str, ignore_eos: bool, **spec) -> tuple[float, list, dict]:
    from kvyard.sampling.params import SamplingParams
    from kvyard.scheduler.io_struct import TokenizedGenerateReq
    from kvyard.scheduler.process import build_scheduler
    from kvyard.server_args import ServerArgs

    args = ServerArgs(model_path=model_path, dtype=dtype, skip_tokenizer_init=True, max_total_tokens=8192,
                      log_level="warning", **spec)
    sched = build_scheduler(args)
    outs, tokens, elapsed = [], 0, 0.0
    for i, ids in enumerate(prompts):   # batch 1: one request at a time
        p = SamplingParams.from_dict({"max_new_tokens": max_new, "temperature": 0, "ignore_eos": ignore_eos})
        p.verify(sched.vocab_size)
        sched.add_request(TokenizedGenerateReq(f"r{i}", ids, p.normalize(None)))
        start = time.perf_counter()
        final = None
        while sched.has_work():
            for u in sched.step():
                final = u if u.finished_reason else final
        elapsed += time.perf_counter() - start
        outs.append(list(final.new_token_ids))
        tokens += len(final.new_token_ids)
    stats = sched.load_info()
    sched.close()
    return tokens / elapsed, outs, stats


def llama_lookup(binary: str, gguf: str, texts: list[str], max_new: int, threads: int, ignore_eos: bool,
                 draft: int = 4):
    """(tok/s over all prompts, acceptance) of llama-lookup, one prompt at a time, greedy."""
    tokens, seconds, drafted, accepted = 0, 0.0, 0, 0
    for text in texts:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write(text)
        try:
            run = subprocess.run([binary, "-m", gguf, "-f", f.name, "-n", str(max_new), "--spec-draft-n-max", str(draft),
                                  "-t", str(threads), "--temp", "0", "-c", "4096", *NO_REPACK,
                                  *(["--ignore-eos"] if ignore_eos else [])],
                                 capture_output=True, text=True, timeout=900)
        finally:
            os.unlink(f.name)
        log = run.stdout + run.stderr
        m = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds", log)
        if run.returncode != 0 or m is None:
            raise RuntimeError(f"llama-lookup failed ({run.returncode}): {log[-400:]}")
        tokens += int(m.group(1))
        seconds += float(m.group(2))
        drafted += int(re.search(r"n_drafted\s*=\s*(\d+)", log).group(1))
        accepted += int(re.search(r"n_accept\s*=\s*(\d+)", log).group(1))
    return tokens / seconds, accepted / drafted if drafted else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--ignore-eos", action="store_true",
                    help="generate max-new-tokens every time (default: stop at the end of the answer, as a user "
                         "would; past it a small model starts an unrelated conversation that copies nothing)")
    ap.add_argument("--ngram-steps", type=int, nargs="*", default=[4], help="NGRAM chain lengths to run")
    ap.add_argument("--ngram-min-match", type=int, nargs="*", default=[1],
                    help="NGRAM shortest matched context suffixes to run (each with every chain length)")
    ap.add_argument("--standalone-steps", type=int, nargs="*", default=[1, 2, 3, 4, 5])
    ap.add_argument("--dtype", default="auto", help="auto: the engine's default (a GGUF stays quantized); "
                    "float32: the dequantized model")
    ap.add_argument("--llama-lookup", default="auto", help="auto | off | path of a llama-lookup binary")
    ns = ap.parse_args()
    from transformers import AutoTokenizer

    from kvyard.model.source import default_model_path
    path = ns.model_path or default_model_path()
    folder, name = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name) if name.endswith(".gguf") else AutoTokenizer.from_pretrained(path)
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True, add_generation_prompt=True,
                                            return_dict=False)) for p in PROMPTS]
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS]
    lookup = {"auto": LOOKUP_BIN, "off": None}.get(ns.llama_lookup, ns.llama_lookup)
    if lookup and not (os.path.exists(lookup) and path.endswith(".gguf")):
        print(f"llama-lookup: skipped (binary {lookup}, model {path}: it needs both, the model as GGUF)")
        lookup = None
    lookup_rates, lookup_accept = [], 0.0
    configs = {"plain": {}}
    for k in ns.ngram_steps:
        for w in ns.ngram_min_match:
            configs[f"NGRAM k={k}" + (f" min{w}" if len(ns.ngram_min_match) > 1 else "")] = dict(
                speculative_algorithm="NGRAM", speculative_num_steps=k, speculative_ngram_min_match_window_size=w)
    configs["NGRAM trie 9 (4x4)"] = dict(speculative_algorithm="NGRAM", speculative_num_steps=4,
                                         speculative_num_draft_tokens=10, speculative_ngram_max_bfs_breadth=4)
    for k in ns.standalone_steps:
        configs[f"STANDALONE self k={k}"] = dict(speculative_algorithm="STANDALONE", speculative_draft_model_path=path,
                                                 speculative_num_steps=k)
    rates = {name: [] for name in configs}
    accept, reference = {}, None
    for _ in range(ns.rounds):
        for name, spec in configs.items():
            rate, outs, stats = run_once(path, prompts, ns.max_new_tokens, ns.dtype, ns.ignore_eos, **spec)
            rates[name].append(rate)
            if name == "plain":
                reference = reference or outs
            else:
                for i, (got, want) in enumerate(zip(outs, reference)):
                    at = next((j for j, (g, w) in enumerate(zip(got, want)) if g != w), min(len(got), len(want)))
                    assert got == want, (f"{name}: prompt {i} differs from plain decoding at output token {at} "
                                         f"({got[at:at + 4]} vs {want[at:at + 4]}, lengths {len(got)}/{len(want)})")
                accept[name] = (stats.get("spec_accept_rate", 0.0), stats.get("spec_accept_length", 0.0))
        if lookup:
            import torch
            rate, lookup_accept = llama_lookup(lookup, path, texts, ns.max_new_tokens, torch.get_num_threads(),
                                                       ns.ignore_eos)
            lookup_rates.append(rate)
    if lookup_rates:
        rates["llama-lookup draft=4"] = lookup_rates
        accept["llama-lookup draft=4"] = (lookup_accept, float("nan"))
    base = statistics.median(rates["plain"])
    print(f"{'configuration':<24} {'tok/s (median)':>14} {'min-max':>15} {'vs plain':>9} {'accept':>7} {'len':>5}")
    for name, r in rates.items():
        med = statistics.median(r)
        a = accept.get(name, (float("nan"), float("nan")))
        print(f"{name:<24} {med:>14.1f} {min(r):>7.1f}-{max(r):<7.1f} {med / base:>8.2f}x {a[0]:>7.2f} {a[1]:>5.2f}")


if __name__ == "__main__":
    main()
