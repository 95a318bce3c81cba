"""The host work of a speculative cycle vs a plain decode step, on the CPU (no GPU needed).

    OMP_NUM_THREADS=1 python benchmarks/speculative_host.py [--layers 4] [--hidden 64] [--steps 4] \
        [--output-len 128] [--rounds 5] [--profile]

A tiny random Llama (dummy weights, float32) is the target; STANDALONE drafts with a 1-layer
truncation of it whose other layers are made to add nothing (as benchmarks/speculative_device.py
does on the H100: acceptance 1, every cycle drafts ``--steps`` tokens and gains steps + 1), at
batch 1. Every scheduler step is split by wall-clock spans (time.perf_counter around the methods
below, exclusive of the spans nested inside them) into

    target compute    ModelRunner.forward_logits of the target (on the GPU: the graph replay)
    draft compute     the same for the draft model's runner
    everything else   scheduling, draft batch building, ForwardBatch prepare, sampling and its
                      host sync, acceptance, KV alloc/free/copy, radix, output processing

and "everything else" is further attributed to the methods that hold it. The model is so small
that "compute" is mostly the CPU's own op dispatch; what predicts the GPU result is the host work
outside it: per speculative cycle against per plain decode step (the GPU pays about that much
host time on top of the graph replays). It also reports the host work from the end of each
cycle's last draft step to the start of the verify's forward (slot allocation, the verify batch,
its prepare): on a GPU that work overlaps the draft steps still running, unless something in it
waits for the drafts (a copy of them to the host). Runs alternate plain / speculative per round (shared,
noisy cores); medians over rounds. ``--profile`` prints a cProfile of the speculative run too.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


class Spans:
    """Exclusive wall time per label: a wrapped call's time minus that of wrapped calls inside it."""

    def __init__(self):
        self.self_s: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[list[float]] = []       # per open span: [children seconds]
        self._wrapped: list[tuple[object, str]] = []
        self.gap_s = 0.0                          # the host work between the drafts and the verify
        self._draft_end: float | None = None

    def wrap(self, obj, attr: str, label) -> None:
        """label: a string, or a function of the call's arguments giving one."""
        orig = getattr(obj, attr)

        def timed(*args, **kwargs):
            self._stack.append([0.0])
            start = time.perf_counter()
            try:
                return orig(*args, **kwargs)
            finally:
                total = time.perf_counter() - start
                children = self._stack.pop()[0]
                name = label if isinstance(label, str) else label(*args, **kwargs)
                self.self_s[name] += total - children
                self.calls[name] += 1
                if self._stack:
                    self._stack[-1][0] += total
        setattr(obj, attr, timed)
        self._wrapped.append((obj, attr))

    def unwrap(self) -> None:
        for obj, attr in self._wrapped:
            delattr(obj, attr)
        self._wrapped.clear()

    def reset(self) -> None:
        self.self_s.clear()
        self.calls.clear()
        self.gap_s = 0.0
        self._draft_end = None

    def mark_draft_end(self, obj, attr: str) -> None:
        """After each call of obj.attr (a draft step) notes the time: the host work until the
        verify's forward starts (``verify_starts``) is the cycle's ``gap_s``."""
        orig = getattr(obj, attr)

        def marked(*args, **kwargs):
            try:
                return orig(*args, **kwargs)
            finally:
                self._draft_end = time.perf_counter()
        setattr(obj, attr, marked)

    def verify_starts(self) -> None:
        if self._draft_end is not None:
            self.gap_s += time.perf_counter() - self._draft_end
            self._draft_end = None


def _kind(batch, *_):
    if getattr(batch, "is_verify", False):
        return "target prepare (verify)"
    return "target prepare (decode)" if batch.mode.is_decode() else "target prepare (extend)"


def wrap_scheduler(sched, spans: Spans) -> None:
    runner = sched.runner
    spans.wrap(sched, "step", "scheduler step (rest)")
    spans.wrap(runner, "forward", "target forward (sampling, host sync, rest)")
    spans.wrap(runner, "prepare", _kind)
    def target_compute(fb):
        if fb.spec_verify:
            spans.verify_starts()
            return "target compute (verify)"
        return "target compute (decode)" if fb.mode.is_decode() else "target compute (extend)"
    spans.wrap(runner, "forward_logits", target_compute)
    for name in ("_schedule_decode", "_schedule_verify", "_alloc", "_process", "_process_verify", "_complete",
                 "_launch"):
        spans.wrap(sched, name, f"scheduler {name.lstrip('_')}")
    spec = sched.speculation
    if spec is None:
        return
    spans.wrap(spec, "propose", "speculation propose (rest)")
    spans.wrap(spec, "verify_batch", "speculation verify_batch")
    spans.wrap(spec, "observe", "speculation observe")
    spans.wrap(spec, "record", "speculation record")
    draft = getattr(spec.algorithm, "draft", None)
    if draft is None:
        return
    spans.wrap(draft.runner, "forward", "draft forward (sampling, host sync, rest)")
    spans.wrap(draft.runner, "prepare", "draft prepare")
    spans.wrap(draft.runner, "forward_logits", lambda fb: "draft compute (decode)" if fb.mode.is_decode()
               else "draft compute (extend)")
    if hasattr(draft.runner, "sample_on_device"):
        spans.wrap(draft.runner, "sample_on_device", "draft sampling (on the device)")
        spans.mark_draft_end(draft.runner, "sample_on_device")   # under the span: unwrap removes both
    for name in ("_sync", "_trim", "_alloc", "_batch", "_plan", "_run"):
        if hasattr(draft, name):
            spans.wrap(draft, name, f"draft {name.lstrip('_')}")


def build(config_dir: str, draft_dir: str | None, steps: int):
    from kvyard.scheduler.process import build_scheduler
    from kvyard.server_args import ServerArgs
    from speculative_device import idle_upper_layers

    spec = {} if draft_dir is None else dict(speculative_algorithm="STANDALONE",
                                              speculative_draft_model_path=draft_dir,
                                              speculative_num_steps=steps)
    args = ServerArgs(model_path=config_dir, load_format="dummy", skip_tokenizer_init=True, dtype="float32",
                      device="cpu", context_length=2048, max_total_tokens=4096, max_running_requests=4,
                      log_level="warning", disable_overlap_schedule=True, **spec)
    sched = build_scheduler(args)
    idle_upper_layers(sched)
    return sched


def run_round(sched, spans: Spans, prompt: list[int], output_len: int, rid: str, profiler=None):
    """One request to completion; spans of its decode phase only (after the prefill)."""
    from kvyard.sampling.params import SamplingParams
    from kvyard.scheduler.io_struct import TokenizedGenerateReq

    p = SamplingParams.from_dict({"max_new_tokens": output_len, "temperature": 0, "ignore_eos": True})
    p.verify(sched.vocab_size)
    sched.add_request(TokenizedGenerateReq(rid, prompt, p.normalize(None)))
    outs = []
    for u in sched.step():               # the prefill
        outs += u.new_token_ids
    before = len(outs)
    spans.reset()
    verify0 = sched.speculation.stats.verify_steps if sched.speculation is not None else 0
    steps, start = 0, time.perf_counter()
    if profiler is not None:
        profiler.enable()
    while sched.has_work():
        steps += 1
        for u in sched.step():
            outs += u.new_token_ids
    if profiler is not None:
        profiler.disable()
    wall = time.perf_counter() - start
    # a cycle: one verify step (speculative), one decode step = one token (plain; several may run
    # in one scheduler step: --num-continuous-decode-steps)
    tokens = len(outs) - before
    cycles = (sched.speculation.stats.verify_steps - verify0) if sched.speculation is not None else tokens
    return {"wall_s": wall, "steps": steps, "cycles": max(cycles, 1), "tokens": tokens,
            "spans": dict(spans.self_s), "calls": dict(spans.calls), "outs": outs, "gap_s": spans.gap_s}


def write_configs(tmp: str, layers: int, hidden: int, vocab: int) -> tuple[str, str]:
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                      max_position_embeddings=4096, tie_word_embeddings=False)
    target, draft = os.path.join(tmp, "target"), os.path.join(tmp, "draft")
    cfg.save_pretrained(target)
    cfg.num_hidden_layers = 1
    cfg.save_pretrained(draft)
    return target, draft


def summarize(rounds: list[dict]) -> dict:
    """Median ms per cycle of each span label, compute vs host totals."""
    labels = sorted({k for r in rounds for k in r["spans"]})
    per = {k: statistics.median(1000 * r["spans"].get(k, 0.0) / r["cycles"] for r in rounds) for k in labels}
    wall = statistics.median(1000 * r["wall_s"] / r["cycles"] for r in rounds)
    compute = sum(v for k, v in per.items() if " compute" in k)
    gap = statistics.median(1000 * r["gap_s"] / r["cycles"] for r in rounds)
    return {"per_cycle_ms": per, "wall_ms": wall, "compute_ms": compute, "host_ms": wall - compute, "gap_ms": gap,
            "tokens_per_cycle": statistics.median(r["tokens"] / r["cycles"] for r in rounds),
            "calls_per_cycle": {k: statistics.median(r["calls"].get(k, 0) / r["cycles"] for r in rounds)
                                for k in labels}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="cProfile the speculative rounds (top 30 by tottime)")
    ap.add_argument("--json", default=None)
    ns = ap.parse_args()
    prompt = [(31 * i + 7) % (ns.vocab - 10) + 5 for i in range(ns.input_len)]
    with tempfile.TemporaryDirectory() as tmp:
        target, draft = write_configs(tmp, ns.layers, ns.hidden, ns.vocab)
        plain, spec = build(target, None, ns.steps), build(target, draft, ns.steps)
        spans = Spans()
        wrap_scheduler(plain, spans)
        wrap_scheduler(spec, spans)
        profiler = cProfile.Profile() if ns.profile else None
        res = {"plain": [], "spec": []}
        for r in range(ns.rounds + 1):          # round 0 warms up
            a = run_round(plain, spans, prompt, ns.output_len, f"p{r}")
            b = run_round(spec, spans, prompt, ns.output_len, f"s{r}", profiler if r else None)
            if a["outs"] != b["outs"]:
                raise SystemExit("speculative output differs from plain decoding")
            if r:
                res["plain"].append(a)
                res["spec"].append(b)
        spans.unwrap()
        plain.close()
        spec.close()
    p, s = summarize(res["plain"]), summarize(res["spec"])
    print(f"tiny Llama {ns.layers} layers, hidden {ns.hidden}, vocab {ns.vocab}; STANDALONE 1-layer draft, "
          f"k={ns.steps}, batch 1, {ns.output_len} tokens x {ns.rounds} rounds (medians)")
    print(f"  tokens per cycle {s['tokens_per_cycle']:.2f}")
    print(f"  {'span (exclusive)':<46} {'spec ms/cycle':>13} {'calls':>6} {'plain ms/step':>13}")
    for k in sorted(set(p["per_cycle_ms"]) | set(s["per_cycle_ms"]), key=lambda k: -s["per_cycle_ms"].get(k, 0)):
        print(f"  {k:<46} {s['per_cycle_ms'].get(k, 0):>13.3f} {s['calls_per_cycle'].get(k, 0):>6.1f} "
              f"{p['per_cycle_ms'].get(k, 0):>13.3f}")
    print(f"  {'wall':<46} {s['wall_ms']:>13.3f} {'':>6} {p['wall_ms']:>13.3f}")
    print(f"  {'compute (target + draft forwards)':<46} {s['compute_ms']:>13.3f} {'':>6} {p['compute_ms']:>13.3f}")
    print(f"  {'host (wall - compute)':<46} {s['host_ms']:>13.3f} {'':>6} {p['host_ms']:>13.3f}")
    print(f"host ms per speculative cycle {s['host_ms']:.2f} vs per plain decode step {p['host_ms']:.2f} "
          f"({s['host_ms'] / p['host_ms']:.1f}x)")
    print(f"host ms per cycle from the last draft step's end to the verify's forward {s['gap_ms']:.3f} "
          "(on a GPU: overlaps the draft steps when nothing in it waits for the drafts)")
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    if ns.json:
        with open(ns.json, "w") as f:
            f.write(json.dumps({"plain": p, "spec": s, "args": vars(ns)}) + "\n")


if __name__ == "__main__":
    main()
