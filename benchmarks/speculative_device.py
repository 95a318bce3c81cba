"""Speculative decoding on one GPU (Llama-3.1-8B shape, dummy weights), batch 1.

    python benchmarks/speculative_device.py [--config benchmarks/configs/llama-3.1-8b] \
        [--steps 1 2 3 4] [--output-len 256] [--json OUT.jsonl]

Measures, on the in-process scheduler (as benchmarks/speculative_cpu.py does):
  1. plain decode tok/s (CUDA graphs on), overlap scheduling off and on (the better is the base);
  2. STANDALONE with the target as its own draft (dummy weights come from a fixed seed, so the
     draft is the target: acceptance 1, the machinery's upper bound) at each --steps: tok/s and
     the ratio to plain, with every output checked equal to plain decoding;
  3. the cost of one verify forward (1 + k tokens) vs one plain decode forward, and of one draft
     forward, from the forwards the runs made (a target forward ends with a host sync; a draft
     model's steps keep their drafts on the device and are timed by CUDA events, GPU time);
  4. an EAGLE-3 head of the Llama-3.1-8B EAGLE-3 shape (1 layer, hidden 4096, 32 heads, 8 KV
     heads, MLP 14336, draft vocabulary 32000; random weights, saved in the published layout):
     the head's draft step time and the end-to-end tok/s (a random head is rarely accepted: the
     figure is the cost side; a trained head's acceptance length multiplies it);
  5. the machinery's upper bound with a cheap draft: STANDALONE with a 1-layer truncation of the
     target as the draft, at acceptance 1. A draft as large as the target costs a target step per
     draft (k drafts + 1 verify for k + 1 tokens: about break-even), so the target's layers 1..L-1
     are made to add nothing to the residual stream (o_proj and down_proj zeroed: they still cost
     their full compute) and the draft gets the target's embedding, layer 0, final norm and LM
     head: both compute the same function, every draft is accepted, and a draft step costs about
     1/L of a target step plus the LM head.
  6. the EAGLE-3 head drafting top-k trees (--eagle3-topk, --eagle3-draft-tokens; SGLang's
     Llama-3.1-8B EAGLE-3 setting is topk 4, 8 draft tokens): its beam steps and the tree-masked
     verify forward (eager: extend graphs decline a batch with a tree mask).
With CUDA graphs on (the default) decode steps, verify steps (1 + k tokens per request) and the
draft model's decode and catch-up steps all replay captured graphs; the "graphs" column says
which runners had them.
Prints a table and writes one JSON line per measurement with --json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
DEVICE_ARGS = dict(dtype="bfloat16", attention_backend="triton")   # --cpu: a float32 dry run of the script
MAX_TOTAL_TOKENS = 16384


class ForwardTimer:
    """Wraps ``obj.attr`` to add the wall time of each call to ``times[key(args)]``; ``unwrap_all``
    restores them (the wrappers hold their objects: without it a finished engine's memory would
    stay allocated into the next run)."""

    active: list["ForwardTimer"] = []

    @classmethod
    def unwrap_all(cls) -> None:
        for timer in cls.active:
            delattr(timer.obj, timer.attr)       # the instance attribute shadowing the method
        cls.active.clear()

    def __init__(self, times: dict, obj, attr: str, key, events: bool = False):
        """events: time the call by CUDA events instead of a host sync after it (calls whose
        results stay on the device, like a draft model's chain steps: a sync would add the host
        round trips the code avoids); ``resolve`` adds their times once the run is over."""
        self.obj, self.attr, self.orig = obj, attr, getattr(obj, attr)
        self.__class__.active.append(self)
        self.pending: list = []          # (key, start event, end event)
        self.times = times
        import torch
        use_events = events and torch.cuda.is_available()

        def timed(*args, **kwargs):
            if use_events:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = self.orig(*args, **kwargs)
                end.record()
                self.pending.append((key(*args), start, end))
                return out
            start = time.perf_counter()
            out = self.orig(*args, **kwargs)
            _sync()
            times[key(*args)].append(time.perf_counter() - start)
            return out
        setattr(obj, attr, timed)

    @classmethod
    def resolve(cls) -> None:
        """Adds the event-timed calls' seconds to their ``times`` (after a device sync)."""
        _sync()
        for timer in cls.active:
            for k, start, end in timer.pending:
                timer.times[k].append(start.elapsed_time(end) / 1000)
            timer.pending.clear()


def _sync() -> None:
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free_memory() -> None:
    import gc

    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def batch_kind(batch, *_):
    if batch.is_verify:
        return f"verify {len(batch.input_ids)} tokens"
    if batch.mode.is_decode():
        return "decode"
    return f"extend {len(batch.input_ids)} tokens" if len(batch.input_ids) <= 8 else "prefill"


def fb_kind(fb, *_):
    """batch_kind of a prepared ForwardBatch (the draft model's steps)."""
    if fb.mode.is_decode():
        return "decode"
    return f"extend {fb.num_tokens} tokens" if fb.num_tokens <= 8 else "prefill"


def graphs_of(runner) -> str:
    """Which CUDA graphs a ModelRunner has: decode buckets and extend width."""
    decode = runner.decode_graphs
    parts = [f"{type(decode).__name__}{getattr(decode, 'sizes', '')}" if decode is not None else "no decode graphs"]
    if runner.extend_graphs is not None:
        parts.append(f"extend x{runner.extend_graphs.width}")
    return " + ".join(parts)



def idle_upper_layers(sched) -> None:
    """The truncated self-draft (module docstring, 5): the target's layers >= 1 add nothing to the
    residual stream, and the 1-layer draft model holds the target's remaining weights."""
    import torch

    target = sched.runner.model
    with torch.no_grad():
        for name, p in target.named_parameters():
            layer = re.search(r"layers\.(\d+)\.", name)
            if layer and int(layer.group(1)) >= 1 and (".o_proj." in name or ".down_proj." in name):
                p.zero_()
        if sched.speculation is None:
            return   # the plain reference of the truncated self-draft
        weights = dict(target.named_parameters())
        for name, p in sched.speculation.algorithm.draft.runner.model.named_parameters():
            p.copy_(weights[name])


def one_layer_config(config: str, out_dir: str) -> str:
    """A copy of ``config`` with one decoder layer (the truncated draft)."""
    with open(os.path.join(config, "config.json")) as f:
        cfg = json.load(f)
    cfg["num_hidden_layers"] = 1
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f)
    return out_dir


def run(config: str, prompt: list[int], output_len: int, rounds: int, overlap: bool = False, prepare=None,
        **spec) -> dict:
    """Batch 1, ``rounds`` requests one after another (the first warms up); tok/s of the rest.
    Overlap off unless asked: speculation makes every step a sync point anyway, and the forwards
    are timed only on the synchronous executor."""
    from kvyard.sampling.params import SamplingParams
    from kvyard.scheduler.io_struct import TokenizedGenerateReq
    from kvyard.scheduler.process import build_scheduler
    from kvyard.server_args import ServerArgs

    args = ServerArgs(model_path=config, load_format="dummy", skip_tokenizer_init=True,
                      context_length=4096, max_total_tokens=MAX_TOTAL_TOKENS, max_running_requests=8,
                      log_level="warning", disable_overlap_schedule=not overlap, **DEVICE_ARGS, **spec)
    sched = build_scheduler(args)
    if prepare is not None:
        prepare(sched)
    graphs = graphs_of(sched.runner)
    times: dict[str, list[float]] = defaultdict(list)
    ForwardTimer(times, sched.runner, "forward", batch_kind)
    algo = sched.speculation.algorithm if sched.speculation is not None else None
    if algo is not None and hasattr(algo, "draft"):   # its steps keep their drafts on the device
        ForwardTimer(times, algo.draft.runner, "sample_on_device", lambda fb, *_: "draft " + fb_kind(fb),
                     events=True)
        graphs += "; draft: " + graphs_of(algo.draft.runner)
    if algo is not None and hasattr(algo, "runner"):
        ForwardTimer(times, algo.runner, "_run", lambda fb, *_: f"head {fb.mode.name.lower()}")
    outs, rates = [], []
    for r in range(rounds):
        p = SamplingParams.from_dict({"max_new_tokens": output_len, "temperature": 0, "ignore_eos": True})
        p.verify(sched.vocab_size)
        sched.add_request(TokenizedGenerateReq(f"r{r}", prompt, p.normalize(None)))
        start = time.perf_counter()
        final = None
        while sched.has_work():
            for u in sched.step():
                final = u if u.finished_reason else final
        elapsed = time.perf_counter() - start
        outs.append(list(final.new_token_ids))
        if r > 0 or rounds == 1:
            rates.append(len(final.new_token_ids) / elapsed)
    stats = sched.load_info()
    sched.close()
    ForwardTimer.resolve()
    ForwardTimer.unwrap_all()
    del sched, algo
    _free_memory()
    return {"tok_s": statistics.median(rates), "outs": outs, "stats": stats, "graphs": graphs,
            "forward_ms": {k: 1000 * statistics.median(v) for k, v in times.items() if v}}


def save_eagle3_head(path: str, config: str, shape: str) -> str:
    """A random EAGLE-3 head for the target config: of the published Llama-3.1-8B EAGLE-3 shape
    (``shape`` "8b"), or a small one."""
    sys.path.insert(0, os.path.join(HERE, "..", "tests", "unit", "scheduler"))
    from eagle_heads import save_eagle3_head as save
    from transformers import AutoConfig

    target = SimpleNamespace(config=AutoConfig.from_pretrained(config))
    n = target.config.num_hidden_layers
    if shape == "8b":
        return save(path, target, draft_vocab=32000, layers=(1, n // 2 - 1, n - 4),
                    shape=dict(num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336))
    return save(path, target, draft_vocab=min(64, target.config.vocab_size), layers=(0, n // 2, n - 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(HERE, "configs", "llama-3.1-8b"))
    ap.add_argument("--steps", type=int, nargs="*", default=[1, 2, 3, 4])
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--eagle3-steps", type=int, default=3)
    ap.add_argument("--eagle3-topk", type=int, default=4, help="tree drafts: top-k per step (1: skip the tree run)")
    ap.add_argument("--eagle3-draft-tokens", type=int, default=8, help="tree drafts: tokens verified per step")
    ap.add_argument("--json", default=None)
    ap.add_argument("--head-shape", default="8b", choices=("8b", "tiny"), help="tiny: a small head (dry runs)")
    ap.add_argument("--cpu", action="store_true", help="float32 on the CPU (a dry run of this script)")
    ns = ap.parse_args()
    if ns.cpu:
        global MAX_TOTAL_TOKENS
        DEVICE_ARGS.update(dtype="float32", attention_backend="auto", device="cpu")
        MAX_TOTAL_TOKENS = 1024
    prompt = [(31 * i + 7) % 30000 + 100 for i in range(ns.input_len)]
    results = {"plain": run(ns.config, prompt, ns.output_len, ns.rounds),
               "plain (overlap on)": run(ns.config, prompt, ns.output_len, ns.rounds, overlap=True)}
    for k in ns.steps:
        results[f"STANDALONE self k={k}"] = run(
            ns.config, prompt, ns.output_len, ns.rounds, speculative_algorithm="STANDALONE",
            speculative_draft_model_path=ns.config, speculative_num_steps=k)
    with tempfile.TemporaryDirectory() as tmp:
        k = max(ns.steps)
        results["plain (layers 1.. idle)"] = run(ns.config, prompt, ns.output_len, ns.rounds,
                                                 prepare=idle_upper_layers)
        results[f"STANDALONE 1-layer k={k}"] = run(
            ns.config, prompt, ns.output_len, ns.rounds, prepare=idle_upper_layers, speculative_algorithm="STANDALONE",
            speculative_draft_model_path=one_layer_config(ns.config, os.path.join(tmp, "draft1")),
            speculative_num_steps=k)
        head = save_eagle3_head(os.path.join(tmp, "eagle3"), ns.config, ns.head_shape)
        results[f"EAGLE3 random head k={ns.eagle3_steps}"] = run(
            ns.config, prompt, ns.output_len, ns.rounds, speculative_algorithm="EAGLE3",
            speculative_draft_model_path=head, speculative_num_steps=ns.eagle3_steps)
        if ns.eagle3_topk > 1:
            results[f"EAGLE3 tree topk={ns.eagle3_topk} n={ns.eagle3_draft_tokens}"] = run(
                ns.config, prompt, ns.output_len, ns.rounds, speculative_algorithm="EAGLE3",
                speculative_draft_model_path=head, speculative_num_steps=ns.eagle3_steps,
                speculative_eagle_topk=ns.eagle3_topk, speculative_num_draft_tokens=ns.eagle3_draft_tokens)
    base = max(results["plain"], results["plain (overlap on)"], key=lambda r: r["tok_s"])
    print(f"{'configuration':<28} {'tok/s':>8} {'vs plain':>9} {'accept len':>10}  forward ms (median)")
    lines = []
    for name, r in results.items():
        ref = results["plain (layers 1.. idle)"] if "1-layer" in name or "idle" in name else base
        same = all(o == ref["outs"][0] for o in r["outs"])
        length = r["stats"].get("spec_accept_length", 1.0)
        ms = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["forward_ms"].items()))
        print(f"{name:<28} {r['tok_s']:>8.1f} {r['tok_s'] / base['tok_s']:>8.2f}x {length:>10.2f}  {ms}"
              + ("" if same else "  OUTPUT DIFFERS FROM PLAIN"))
        lines.append({"workload": "speculative_batch1", "config": name, "tok_s": r["tok_s"],
                      "vs_plain": r["tok_s"] / base["tok_s"], "accept_length": length,
                      "forward_ms": r["forward_ms"], "equal_to_plain": same, "graphs": r["graphs"]})
    print("graphs: " + "; ".join(f"{name}: {r['graphs']}" for name, r in results.items()))
    for line in step_costs(results, results["plain"]):
        print(line)
    for line in cycle_split(results):
        print(line)
    if ns.json:
        with open(ns.json, "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)


def step_costs(results: dict, base: dict) -> list[str]:
    """The verify step vs a plain decode step of ``base`` (a synchronous run: its forwards are
    timed), and the draft steps (median ms: a draft model's step with its sampling, by CUDA
    events; a head's step with its host sync)."""
    decode = base["forward_ms"].get("decode")
    lines = []
    for name, r in results.items():
        for kind, ms in sorted(r["forward_ms"].items()):
            if kind.startswith("verify") and decode:
                lines.append(f"{name}: {kind} {ms:.2f} ms = {ms / decode:.2f}x a plain decode step ({decode:.2f} ms)")
            elif kind.startswith(("draft decode", "head")):
                lines.append(f"{name}: draft step ({kind}) {ms:.2f} ms")
    return lines


def cycle_split(results: dict) -> list[str]:
    """Per STANDALONE row: the wall time of one cycle (from tok/s and tokens per verify) against
    the median forwards it runs (a verify, a draft catch-up extend, k - 1 draft decode steps); the
    rest is host work the GPU did not hide (benchmarks/speculative_host.py splits it on the CPU).
    tok/s counts the request's prefill too: with short outputs the rest overstates it."""
    lines = []
    for name, r in results.items():
        m = re.search(r"STANDALONE .* k=(\d+)", name)
        ms = r["forward_ms"]
        verify = next((v for k, v in ms.items() if k.startswith("verify")), None)
        if not m or verify is None or "draft decode" not in ms:
            continue
        k = int(m.group(1))
        catch_up = next((v for key, v in ms.items() if key.startswith("draft extend")), ms["draft decode"])
        forwards = verify + catch_up + (k - 1) * ms["draft decode"]
        cycle = 1000 * r["stats"].get("spec_accept_length", 1.0) / r["tok_s"]
        lines.append(f"{name}: cycle {cycle:.2f} ms = forwards {forwards:.2f} ms (verify {verify:.2f}, draft "
                     f"catch-up {catch_up:.2f}, {k - 1} x draft decode {ms['draft decode']:.2f}) + "
                     f"{cycle - forwards:.2f} ms outside them")
    return lines


if __name__ == "__main__":
    main()
