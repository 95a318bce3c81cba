"""Multi-LoRA serving cost, on the in-process scheduler (kvyard.lora).

    python benchmarks/lora_bench.py offline [--model-path M] [--num-prompts 32] [--input-len 128]
        [--output-len 128] [--adapters 0 1 4] [--rank 16] [--rounds 3]
    python benchmarks/lora_bench.py decode --model-path CFG --load-format dummy --dtype bfloat16
        [--batch-sizes 1 64] [--adapters 1 8] [--rank 16] [--decode-steps 64]
    python benchmarks/lora_bench.py kernels [--batch-sizes 1 64] [--adapters 1 8] [--rank 16]
        [--layers qkv o gate_up down]

offline: N prompts of random ids, all submitted at once, greedy; the wall time of the whole run
and output tokens/s for the base model with LoRA serving off ("base") and on, the requests
spread round-robin over K distinct adapters (K = 0: LoRA on, every request on the base model).
decode: B requests prefilled, then the mean time of the next decode steps, same configurations
(--pair-adapters K: also K adapters on an engine that keeps the shrink/expand pair per layer).
Both alternate the configurations within each round (noisy shared machines) and print the
median with the min-max spread. kernels: Llama-3.1-8B's LoRA layers (qkv 4096 -> 4096 + 1024 +
1024, o, gate_up 4096 -> 2 x 14336, down 14336 -> 4096) at decode, the Triton shrink/expand pair
(and each kernel alone: which one dominates) vs the torch path (one matmul pair per adapter) vs a
plain loop over the requests; eager calls, so launch costs are included. Beside them the fused
form serving uses for unquantized weights (kvyard.lora.hook): the base GEMM alone, the GEMM over
W_ext (the base rows plus every slot's A rows: S = the largest --adapters) with the one expand
launch, and that expand alone; "fused overhead" = fused gemm + expand - base gemm, the LoRA cost
of the layer (the old pair's is its "triton" row). decode prints how many layers fuse.

Adapters are random rank-R PEFT folders over all seven projections, written for the served
model's shapes into a temporary folder and loaded at runtime (no peft needed).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def write_adapter(lora, path: str, rank: int, seed: int) -> None:
    """A random PEFT folder fitting the served model (every layer the LoRAManager can target)."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors, modules = {}, set()
    for name, (target, shard) in lora.by_peft.items():
        fan_in, fan_out = target.layer.in_features, target.layer.output_sizes[shard]
        key = f"base_model.model.{name}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) / fan_in ** 0.5
        tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * 0.01
        modules.add(name.rsplit(".", 1)[-1])
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as fh:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": sorted(modules)}, fh)


def make_scheduler(ns, lora: bool, max_adapters: int, tmp: str):
    from kvyard.scheduler.process import build_scheduler
    from kvyard.server_args import ServerArgs

    extra = dict(enable_lora=True, max_loras_per_batch=max(1, max_adapters), max_lora_rank=ns.rank,
                 lora_target_modules=["all"]) if lora else {}
    args = ServerArgs(model_path=ns.model_path, load_format=ns.load_format, dtype=ns.dtype, skip_tokenizer_init=True,
                      max_total_tokens=ns.max_total_tokens, max_running_requests=ns.max_running_requests,
                      log_level="warning", disable_radix_cache=True, context_length=ns.context_length,
                      num_threads=ns.num_threads, attention_backend=ns.attention_backend,
                      num_continuous_decode_steps=1, **extra)   # run_decode times one step per sched.step()
    sched = build_scheduler(args)
    if lora:
        for k in range(max_adapters):
            path = os.path.join(tmp, f"a{k}")
            if not os.path.isdir(path):
                write_adapter(sched.runner.lora, path, ns.rank, seed=k)
            sched.runner.lora.load(f"a{k}", path)
    return sched


def params(max_new: int, vocab: int):
    from kvyard.sampling.params import SamplingParams

    p = SamplingParams.from_dict({"max_new_tokens": max_new, "temperature": 0, "ignore_eos": True})
    p.verify(vocab)
    return p.normalize(None)


def submit(sched, n: int, input_len: int, output_len: int, adapters: int, seed: int) -> None:
    import random

    from kvyard.scheduler.io_struct import TokenizedGenerateReq

    rng = random.Random(seed)
    for i in range(n):
        ids = [rng.randrange(10, sched.vocab_size - 10) for _ in range(input_len)]
        lora = f"a{i % adapters}" if adapters else None
        sched.add_request(TokenizedGenerateReq(f"r{seed}-{i}", ids, params(output_len, sched.vocab_size),
                                               lora_name=lora))


def run_offline(sched, ns, adapters: int, seed: int) -> float:
    """Output tokens per second of the whole batch (prefill included)."""
    submit(sched, ns.num_prompts, ns.input_len, ns.output_len, adapters, seed)
    start = time.perf_counter()
    while sched.has_work():
        sched.step()
    _sync(sched)
    return ns.num_prompts * ns.output_len / (time.perf_counter() - start)


def run_decode(sched, batch: int, ns, adapters: int, seed: int) -> float:
    """Mean milliseconds of one decode step of ``batch`` requests, after their prefill."""
    submit(sched, batch, ns.input_len, ns.decode_steps + 8, adapters, seed)
    while sched.waiting or sched.chunked_req is not None or len(sched.running) < batch:
        sched.step()
    for _ in range(3):   # warm-up steps (graph replays, allocator)
        sched.step()
    _sync(sched)
    start = time.perf_counter()
    for _ in range(ns.decode_steps):
        sched.step()
    _sync(sched)
    elapsed = time.perf_counter() - start
    while sched.has_work():
        sched.step()
    return elapsed / ns.decode_steps * 1e3


def _sync(sched) -> None:
    import torch

    if sched.runner.device == "cuda":
        torch.cuda.synchronize()


def summarize(results: dict[str, list[float]], unit: str, base: str) -> list[dict]:
    rows = []
    ref = statistics.median(results[base]) if base in results else None
    for name, values in results.items():
        med = statistics.median(values)
        row = {"config": name, "median": round(med, 3), "min": round(min(values), 3), "max": round(max(values), 3),
               "unit": unit, "runs": len(values)}
        if ref:
            row["vs_" + base] = round(med / ref, 3)
        rows.append(row)
        spread = f"{min(values):.2f}-{max(values):.2f}"
        ratio = f"  x{med / ref:.3f} vs {base}" if ref else ""
        print(f"  {name:<24} {med:9.2f} {unit}  (min-max {spread}, {len(values)} runs){ratio}", flush=True)
    return rows


def offline(ns) -> list[dict]:
    print(f"offline: {ns.num_prompts} x {ns.input_len}/{ns.output_len}, rank {ns.rank}, {ns.rounds} rounds")
    with tempfile.TemporaryDirectory() as tmp:
        configs = {"base": make_scheduler(ns, False, 0, tmp),
                   "lora on": make_scheduler(ns, True, max(ns.adapters), tmp)}
        results: dict[str, list[float]] = {}
        for r in range(ns.rounds):
            results.setdefault("base", []).append(run_offline(configs["base"], ns, 0, seed=r))
            for k in ns.adapters:
                results.setdefault(f"lora, {k} adapters", []).append(run_offline(configs["lora on"], ns, k, seed=r))
            print(f"  round {r + 1}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in results.items()), flush=True)
        return summarize(results, "tok/s", "base")


def decode(ns) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        plain = make_scheduler(ns, False, 0, tmp)
        lora = make_scheduler(ns, True, max(ns.adapters), tmp)
        hooks = [t.layer.lora_hook for t in lora.runner.lora.targets.values()]
        print(f"decode: {sum(h.fused for h in hooks)} of {len(hooks)} LoRA layers fuse the shrink into their GEMM "
              f"(backend {lora.runner.lora.config.backend})", flush=True)
        pair = pair_engine(ns, tmp) if ns.pair_adapters else None
        for batch in ns.batch_sizes:
            print(f"decode: batch {batch}, {ns.input_len} in, {ns.decode_steps} steps timed, rank {ns.rank}")
            results: dict[str, list[float]] = {}
            for r in range(ns.rounds):
                results.setdefault("no lora", []).append(run_decode(plain, batch, ns, 0, seed=r))
                for k in ns.adapters:
                    results.setdefault(f"{k} adapters", []).append(run_decode(lora, batch, ns, k, seed=r))
                for k in ns.pair_adapters if pair is not None else ():
                    results.setdefault(f"{k} adapters (pair)", []).append(run_decode(pair, batch, ns, k, seed=r))
            rows += [{"batch": batch, **row} for row in summarize(results, "ms/step", "no lora")]
    return rows


def pair_engine(ns, tmp: str):
    """A third engine serving LoRA through the shrink/expand pair in every layer (the fused form's
    reference: its hooks turned unfused, the A rows read from the weights' tails by the shrink,
    decode graphs captured again); None, said on stdout, when it cannot be built (memory)."""
    try:
        sched = make_scheduler(ns, True, max(ns.adapters), tmp)
        for t in sched.runner.lora.targets.values():
            t.layer.lora_hook.fused = False
        if sched.runner.decode_graphs is not None:
            sched.runner.decode_graphs = None
            sched.runner.decode_graphs = sched.runner._init_decode_graphs()
        return sched
    except Exception as exc:   # the main comparison goes on without it
        print(f"decode: no shrink/expand pair engine ({type(exc).__name__}: {str(exc)[:200]})", flush=True)
        return None


LAYERS = {   # Llama-3.1-8B's four LoRA layers: (input width, output shard widths)
    "qkv": (4096, [4096, 1024, 1024]), "o": (4096, [4096]), "gate_up": (4096, [14336, 14336]),
    "down": (14336, [4096]),
}


def kernels(ns) -> list[dict]:
    import torch

    from kvyard.kernels.triton_ops.lora import lora_expand, lora_shrink, split_plan
    from kvyard.lora.batch import build_batch_info
    from kvyard.lora.ops import lora_torch, lora_triton
    slots_total = max(ns.adapters)

    dev, dtype, rank = "cuda", torch.bfloat16, ns.rank
    rows = []
    for layer in ns.layers:
        fan_in, sizes = LAYERS[layer]
        n = len(sizes)
        print(f"{layer}: {fan_in} -> {sum(sizes)}, split-K up to {split_plan(fan_in)[0]}", flush=True)
        for batch in ns.batch_sizes:
            for k in ns.adapters:
                a = torch.randn(k, n * rank, fan_in, device=dev, dtype=dtype) * 0.01
                b = torch.randn(k, sum(sizes), rank, device=dev, dtype=dtype) * 0.01
                x = torch.randn(batch, fan_in, device=dev, dtype=dtype)
                y = torch.zeros(batch, sum(sizes), device=dev, dtype=dtype)
                slots = [i % k for i in range(batch)]
                info = build_batch_info(slots, [1] * batch, dev)
                seg = (info.seg_indptr, info.seg_slots, info.max_seg_len)
                part = lora_shrink(x, a, *seg)

                def loop():   # one request at a time: the naive reference
                    for i, s in enumerate(slots):
                        xa = x[i:i + 1] @ a[s].t()
                        y[i:i + 1] += torch.cat([xa[:, j * rank:(j + 1) * rank]
                                                 @ b[s, sum(sizes[:j]):sum(sizes[:j + 1])].t() for j in range(n)], dim=1)
                want = lora_torch(x, torch.zeros_like(y), a, b, sizes, info)
                torch.testing.assert_close(lora_triton(x, torch.zeros_like(y), a, b, sizes, info), want,
                                           rtol=2e-2, atol=2e-2)   # the kernels agree on the device too
                fused = _fused_case(x, a, b, sizes, info, slots_total, want)
                fns = {"triton": lambda: lora_triton(x, y, a, b, sizes, info),
                       "triton shrink": lambda: lora_shrink(x, a, *seg),
                       "triton expand": lambda: lora_expand(part, b, y, sizes, *seg),
                       "torch (per adapter)": lambda: lora_torch(x, y, a, b, sizes, info),
                       "torch loop (per request)": loop, **fused}
                times = {name: _time_us(fn, ns.kernel_iters) for name, fn in fns.items()}
                times["fused overhead"] = times["fused gemm + expand"] - times["base gemm"]
                for name, us in times.items():
                    rows.append({"layer": layer, "batch": batch, "adapters": k, "impl": name, "us": round(us, 1)})
                    print(f"  {layer} {fan_in}->{sum(sizes)} rank {rank}, batch {batch}, {k} adapters: "
                          f"{name:<26} {us:8.1f} us", flush=True)
    return rows


def _fused_case(x, a, b, sizes, info, slots_total: int, want) -> dict:
    """The fused form's calls for one case: a random base weight W [out, in], W_ext = W then the A
    rows of ``slots_total`` slots (the first len(a) hold a, the rest zeros); the expand of the
    GEMM's h is checked first against the torch LoRA term ``want``."""
    import torch
    import torch.nn.functional as F

    from kvyard.kernels.triton_ops.lora import lora_expand_fused

    k, nr, fan_in = a.shape
    out = sum(sizes)
    w = torch.randn(out, fan_in, device=x.device, dtype=x.dtype) * 0.02
    w_ext = torch.zeros(out + slots_total * nr, fan_in, device=x.device, dtype=x.dtype)
    w_ext[:out] = w
    w_ext[out:out + k * nr] = a.reshape(k * nr, fan_in)
    b_all = torch.zeros(slots_total, out, b.shape[2], device=b.device, dtype=b.dtype)
    b_all[:k] = b
    seg = (info.seg_indptr, info.seg_slots, info.max_seg_len)

    def gemm_expand():
        y_ext = F.linear(x, w_ext)
        return lora_expand_fused(y_ext[:, out:], b_all, y_ext[:, :out], sizes, *seg)

    y_ext = F.linear(x, w_ext)
    torch.testing.assert_close(lora_expand_fused(y_ext[:, out:], b_all, torch.zeros_like(y_ext[:, :out]), sizes, *seg),
                               want, rtol=2e-2, atol=2e-2)   # the LoRA term the expand adds to y
    return {"base gemm": lambda: F.linear(x, w), "fused gemm + expand": gemm_expand,
            "fused expand": lambda: lora_expand_fused(y_ext[:, out:], b_all, y_ext[:, :out], sizes, *seg)}


def _time_us(fn, iters: int) -> float:
    """Mean microseconds of one call, launches included (no graph), after 5 warm-up calls."""
    import torch

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("offline", "decode", "kernels"))
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--adapters", type=int, nargs="+", default=None)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--kernel-iters", type=int, default=200)
    parser.add_argument("--pair-adapters", type=int, nargs="*", default=[],
                        help="decode: also these adapter counts on a third engine whose layers keep the "
                             "shrink/expand pair (the fused form's reference)")
    parser.add_argument("--layers", nargs="+", choices=sorted(LAYERS), default=["qkv", "o", "gate_up", "down"],
                        help="kernels: the Llama-3.1-8B LoRA layers to time")
    parser.add_argument("--max-total-tokens", type=int, default=32768)
    parser.add_argument("--max-running-requests", type=int, default=None)
    parser.add_argument("--context-length", type=int, default=4096)
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--num-threads", type=int, default=None, help="CPU compute threads (default: physical cores)")
    parser.add_argument("--json", default=None, help="append the result rows to this JSON-lines file")
    ns = parser.parse_args(argv)
    if ns.model_path is None and ns.mode != "kernels":   # the kernels run on random tensors
        from kvyard.model.source import default_model_path
        ns.model_path = default_model_path()
    ns.adapters = ns.adapters or ([0, 1, 4] if ns.mode == "offline" else [1, 8])
    rows = {"offline": offline, "decode": decode, "kernels": kernels}[ns.mode](ns)
    if ns.json:
        with open(ns.json, "a") as fh:
            for row in rows:
                fh.write(json.dumps({"mode": ns.mode, "model": os.path.basename((ns.model_path or "").rstrip("/")), **row}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
