"""The C++ decode loop (kvyard.kernels.decode_loop via kvyard.executor.lowered_decode) gives the
Python decode step's logits bit for bit, and is refused where a part cannot be lowered."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from forward_harness import Harness
from quant_helpers import PROMPTS, TINY, harness, tiny_llama
from kvyard.executor.lowered_decode import LoweredDecodeRunner
from kvyard.kernels import decode_loop
from kvyard.layers.linear import Linear
from kvyard.loader import QuantizedTensor
from kvyard.model_base import ModelBuildContext
from kvyard.model_registry import ModelRegistry
from kvyard.quantization import QuantizationConfig

pytestmark = pytest.mark.skipif(not decode_loop.available(), reason="the C++ decode loop does not build here")


class LoopHarness(Harness):
    """Decode steps through the lowered runner; extend steps as the Python model runs them."""

    def __init__(self, base: Harness, runner: LoweredDecodeRunner):
        super().__init__(base.model, base.backend, base.kv)
        self.runner = runner

    @torch.inference_mode()
    def run(self, fb, seqs):
        if not self.runner.can_run(fb):
            return super().run(fb, seqs)
        logits = self.runner.replay(fb)
        for seq in seqs:
            seq.kv_len += 1
        return logits


def kvyard_model(hf, dtype=torch.float32):
    model = ModelRegistry.resolve(hf.config.architectures)(hf.config, ModelBuildContext(dtype, "cpu"))
    model.load_weights((k, v.to(dtype)) for k, v in hf.state_dict().items())
    return model.eval()


def both_paths(model, cfg, steps=12):
    python = harness(model, cfg).generate(PROMPTS, steps)
    base = harness(model, cfg)
    runner = LoweredDecodeRunner.build(model, base.backend, base.kv.pool, "cpu")
    assert runner is not None
    return python, LoopHarness(base, runner).generate(PROMPTS, steps)


@pytest.mark.parametrize("overrides", [{}, {"attention_bias": True, "architectures": ["Qwen2ForCausalLM"]}],
                         ids=["llama", "qkv-bias"])
def test_loop_logits_equal_the_python_step(overrides):
    hf = tiny_llama(**overrides)
    if "architectures" in overrides:
        hf.config.architectures = overrides["architectures"]
    else:
        hf.config.architectures = ["LlamaForCausalLM"]
    python, loop = both_paths(kvyard_model(hf), hf.config)
    assert loop.tokens == python.tokens
    for a, b in zip(loop.logits, python.logits):
        assert torch.equal(a, b)


def test_models_that_cannot_be_lowered_keep_the_python_step():
    hf = tiny_llama(sliding_window=8, use_sliding_window=True)
    hf.config.architectures = ["MistralForCausalLM"]
    model = kvyard_model(hf)
    base = harness(model, hf.config)
    if not any(layer.self_attn.attn.sliding_window for layer in model.model.layers):
        pytest.skip("this transformers config carries no sliding window")
    assert LoweredDecodeRunner.build(model, base.backend, base.kv.pool, "cpu") is None


def test_off_switch(monkeypatch):
    hf = tiny_llama()
    hf.config.architectures = ["LlamaForCausalLM"]
    model = kvyard_model(hf)
    base = harness(model, hf.config)
    monkeypatch.setenv("KVYARD_CPU_DECODE_LOOP", "0")
    assert LoweredDecodeRunner.build(model, base.backend, base.kv.pool, "cpu") is None


@pytest.mark.parametrize("sizes, bias", [([96], True), ([64, 32, 32], False), ([64, 32, 32], True)])
def test_gguf_lowered_calls_equal_apply(sizes, bias):
    """Kept-quantized GGUF layers lower to the int kernel the method calls itself, with the
    fused segments and the bias handled the same way."""
    from kvyard_plugins.quantization.gguf_method import GGUFQuantization

    method = GGUFQuantization(QuantizationConfig("gguf", torch.float32, "cpu")).linear_method("t")
    layer = Linear(64, sizes, bias=bias, method=method, prefix="t", dtype=torch.float32)
    rng = np.random.default_rng(0)
    Q = gguf.GGMLQuantizationType
    for shard, rows in enumerate(sizes):
        qtype = Q.Q4_1 if shard != 1 else Q.Q8_0
        data = gguf.quants.quantize(rng.standard_normal((rows, 64), dtype=np.float32), qtype)
        layer.load_shard(shard, QuantizedTensor(torch.from_numpy(data), (rows, 64), int(qtype)))
        if bias:
            layer.load_bias_shard(shard, torch.randn(rows))
    layer.process_after_loading()
    low = method.lower(layer)
    x = torch.randn(3, 64)
    assert torch.equal(low(x), method.apply(layer, x))
    assert low.max_rows is not None and low.max_rows >= 1


# -- the native step (one OpenMP region over native descriptors) --------------------------------

def gguf_llama(dtype: torch.dtype, quantized_head: bool = False):
    """A tiny Llama kept quantized by the GGUF method: Q4_1 projections, Q8_0 v_proj (so the
    fused qkv layer has two segments of different formats), and a Q8_0 lm_head if asked."""
    from kvyard_plugins.quantization.gguf_method import GGUFQuantization

    hf = tiny_llama()
    hf.config.architectures = ["LlamaForCausalLM"]
    quant = GGUFQuantization(QuantizationConfig("gguf", dtype, "cpu"))
    model = ModelRegistry.resolve(hf.config.architectures)(hf.config, ModelBuildContext(dtype, "cpu", quant))
    Q = gguf.GGMLQuantizationType

    def weights():
        for name, value in hf.state_dict().items():
            if name.endswith("proj.weight") or (quantized_head and name == "lm_head.weight"):
                qtype = Q.Q8_0 if "v_proj" in name or "lm_head" in name else Q.Q4_1
                data = gguf.quants.quantize(value.float().numpy(), qtype)
                yield name, QuantizedTensor(torch.from_numpy(data), tuple(value.shape), int(qtype))
            else:
                yield name, value.to(dtype)

    model.load_weights(weights())
    return model.eval(), hf.config


def dtype_harness(model, cfg, dtype: torch.dtype, max_reqs: int = 16) -> Harness:
    """quant_helpers.harness with the activations and the pool in ``dtype``."""
    from dataclasses import replace

    from forward_harness import PagedKV
    from kvyard.plugins import registry

    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv = PagedKV(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, num_pages=1024, dtype=dtype,
                 max_reqs=max_reqs)
    config = replace(kv.backend_config(cfg.num_attention_heads, head_dim, max_reqs), dtype=dtype)
    return Harness(model, registry("attention_backends").get("torch_native")(config), kv)


def generate_with(model, cfg, dtype, prompts, native: bool, monkeypatch, steps=10):
    base = dtype_harness(model, cfg, dtype)
    with monkeypatch.context() as m:
        m.setenv("KVYARD_CPU_NATIVE_STEP", "1" if native else "0")
        runner = LoweredDecodeRunner.build(model, base.backend, base.kv.pool, "cpu")
    assert runner is not None and (runner.native is not None) == native
    if native and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        # rmsnorm's row sums in ATen's own order, not through at::sum (checked at plan build)
        assert torch.ops.kvyard_decode.native_plan_sum_lanes(runner.native.id) in (8, 16)
    return LoopHarness(base, runner).generate(prompts, steps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("batch", [1, 4])
def test_native_step_equals_the_dispatcher_loop(dtype, batch, monkeypatch):
    model, cfg = gguf_llama(dtype)
    prompts = PROMPTS[:batch]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)   # the stages split over threads, with barriers between them
    try:
        native = generate_with(model, cfg, dtype, prompts, True, monkeypatch)
        loop = generate_with(model, cfg, dtype, prompts, False, monkeypatch)
    finally:
        torch.set_num_threads(threads)
    python = dtype_harness(model, cfg, dtype).generate(prompts, 10)
    assert native.tokens == loop.tokens == python.tokens
    for a, b, c in zip(native.logits, loop.logits, python.logits):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_native_step_needs_every_piece_native():
    """A dense (float) model has no native linears: the runner keeps the dispatcher loop."""
    hf = tiny_llama()
    hf.config.architectures = ["LlamaForCausalLM"]
    model = kvyard_model(hf)
    base = harness(model, hf.config)
    runner = LoweredDecodeRunner.build(model, base.backend, base.kv.pool, "cpu")
    assert runner is not None and runner.native is None and runner.native_max == 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_native_step_on_the_default_model(smollm2_path, dtype, monkeypatch):
    """SmolLM2 Q4_1 kept quantized (the default model): the native step's logits are the
    dispatcher loop's and the Python step's, bit for bit, at batch 1 and 3."""
    from quant_helpers import runner

    r = runner(smollm2_path, "gguf", dtype=dtype)
    assert r.decode_graphs is not None and r.decode_graphs.native is not None
    model, cfg, torch_dtype = r.model, r.model_config.hf_config, getattr(torch, dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for prompts in (PROMPTS[:1], PROMPTS[:3]):
            native = generate_with(model, cfg, torch_dtype, prompts, True, monkeypatch, steps=6)
            loop = generate_with(model, cfg, torch_dtype, prompts, False, monkeypatch, steps=6)
            python = dtype_harness(model, cfg, torch_dtype).generate(prompts, 6)
            assert native.tokens == loop.tokens == python.tokens
            for a, b, c in zip(native.logits, loop.logits, python.logits):
                assert torch.equal(a, b) and torch.equal(a, c)
    finally:
        torch.set_num_threads(threads)


def test_native_step_equal_with_a_busy_core_beside(monkeypatch):
    """With another process holding a core, the team's helpers get preempted mid-chunk and the
    step may fall back to solo steps (team.h): the results stay the loop's, bit for bit."""
    import subprocess
    import sys

    model, cfg = gguf_llama(torch.bfloat16)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        native = generate_with(model, cfg, torch.bfloat16, PROMPTS[:2], True, monkeypatch, steps=24)
    finally:
        torch.set_num_threads(threads)
        busy.kill()
        busy.wait()
    loop = generate_with(model, cfg, torch.bfloat16, PROMPTS[:2], False, monkeypatch, steps=24)
    assert native.tokens == loop.tokens
    for a, b in zip(native.logits, loop.logits):
        assert torch.equal(a, b)


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512", reason="the X16 layouts need AVX-512")
def test_x16_decode_batches_past_sixteen_rows_take_the_int_kernel(monkeypatch):
    """With the 16-row interleaved layouts the lowered plans take decode batches up to 47 rows on
    the int kernel, and a row's result does not depend on its batch: 20 requests decoded together
    give each request's logits decoded alone (same prefill), bit for bit, the Q8_0 LM head's too."""
    from kvyard_plugins.quantization import gguf_kernels

    if gguf_kernels.simd_level() != "avx512":
        pytest.skip("the int kernel runs below AVX-512 here")
    model, cfg = gguf_llama(torch.bfloat16, quantized_head=True)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 320, (int(n),), generator=g).tolist() for n in torch.randint(4, 30, (20,), generator=g)]

    def decoder():
        base = dtype_harness(model, cfg, torch.bfloat16, max_reqs=len(prompts))
        runner = LoweredDecodeRunner.build(model, base.backend, base.kv.pool, "cpu")
        assert runner.max_batch == gguf_kernels.DECODE_INT_MAX_M_X16 == runner.native_max
        assert runner.lm_head.max_rows == gguf_kernels.DECODE_INT_MAX_M_X16
        h = LoopHarness(base, runner)
        seqs = h.add(prompts)
        first = h.prefill(seqs).argmax(-1).tolist()
        for seq, token in zip(seqs, first):
            seq.tokens.append(token)
        return h, seqs

    together, alone = decoder(), decoder()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for _ in range(8):
            h, seqs = together
            batch = h.decode_batch(seqs)
            assert h.runner.can_run(batch)
            rows = h.run(batch, seqs)
            h1, seqs1 = alone
            ones = torch.cat([h1.run(h1.decode_batch([s]), [s]) for s in seqs1])
            assert torch.equal(rows, ones)
            for s, s1, a, b in zip(seqs, seqs1, rows.argmax(-1).tolist(), ones.argmax(-1).tolist()):
                assert a == b
                s.tokens.append(a)
                s1.tokens.append(b)
    finally:
        torch.set_num_threads(threads)


def prefilled_with_drafts(model, cfg, dtype, prompts, chains):
    """A loop harness whose requests are prefilled, each with its draft chain appended (pending)."""
    base = dtype_harness(model, cfg, dtype)
    h = LoopHarness(base, LoweredDecodeRunner.build(model, base.backend, base.kv.pool, "cpu"))
    seqs = h.add(prompts)
    h.prefill(seqs)
    for seq, chain in zip(seqs, chains):
        seq.tokens += chain
    return h, seqs


@pytest.mark.parametrize("native", [True, False], ids=["native-step", "dispatcher-loop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_chain_verify_rows_equal_one_decode_step_per_token(dtype, native, monkeypatch):
    """A speculative verify of chain drafts runs as decode rows (the native step writing every
    row's K/V before the attention stage, or the dispatcher loop): the logits of every draft
    position equal, bit for bit, those of decoding the same tokens one step at a time (what the
    request would compute without speculation)."""
    model, cfg = gguf_llama(dtype, quantized_head=True)
    prompts, chains = PROMPTS[:2], [[5, 9, 13, 2, 40], [7, 7, 8]]
    monkeypatch.setenv("KVYARD_CPU_NATIVE_STEP", "1" if native else "0")

    def prefilled():
        h, seqs = prefilled_with_drafts(model, cfg, dtype, prompts, chains)
        assert (h.runner.native is not None) == native
        return h, seqs

    h, seqs = prefilled()
    stepwise = {i: [] for i in range(len(seqs))}
    while any(s.pending for s in seqs):
        live = [i for i, s in enumerate(seqs) if s.pending]
        rows = h.run(h.decode_batch([seqs[i] for i in live]), [seqs[i] for i in live])
        for i, row in zip(live, rows):
            stepwise[i].append(row)

    h, seqs = prefilled()
    fb = h.extend_batch(seqs, [len(c) for c in chains], all_logits=True)
    fb.spec_verify = True
    assert h.runner.can_run(fb)
    h.backend.init_forward_metadata(fb)
    verify = h.runner.replay(fb).split([len(c) for c in chains])
    for i, rows in enumerate(verify):
        assert torch.equal(rows, torch.stack(stepwise[i]))
    fb.spec_verify = False
    assert not h.runner.can_run(fb)   # a plain extend keeps the Python step


def test_tree_verify_rows_equal_decoding_each_path(monkeypatch):
    """A tree verify as decode rows: node r sees the prefix and its ancestors in depth order, so
    its logits equal, bit for bit, decoding its root-to-node path one token at a time."""
    from kvyard.forward_batch import TreeMask

    model, cfg = gguf_llama(torch.bfloat16, quantized_head=True)
    prompt, tokens = PROMPTS[1], [11, 22, 33, 44, 55]
    parent = [-1, 0, 0, 1, 2]                      # two branches under the root

    def path(r):
        return path(parent[r]) + [r] if r >= 0 else []

    def harness_with_prefill():
        h, seqs = prefilled_with_drafts(model, cfg, torch.bfloat16, [prompt], [[]])
        return h, seqs[0]

    expected = {}
    for leaf in (3, 4):
        h, seq = harness_with_prefill()
        for r in path(leaf):
            seq.tokens.append(tokens[r])
            expected[r] = h.run(h.decode_batch([seq]), [seq])[0]

    h, seq = harness_with_prefill()
    prefix = seq.kv_len
    seq.tokens += tokens
    fb = h.extend_batch([seq], [len(tokens)], all_logits=True)
    fb.positions = torch.tensor([prefix + len(path(r)) - 1 for r in range(len(tokens))])
    fb.spec_tree = TreeMask.from_rows([[[c in path(r) for c in range(len(tokens))] for r in range(len(tokens))]], "cpu")
    fb.spec_verify = True
    assert h.runner.can_run(fb)
    got = h.runner.replay(fb)
    for r in range(len(tokens)):
        assert torch.equal(got[r], expected[r]), r


def test_request_groups_keep_requests_whole():
    from kvyard.executor.lowered_decode import _request_groups

    assert _request_groups([5, 5, 5], 15) == [(0, 15)]
    assert _request_groups([5, 5, 5, 5], 15) == [(0, 15), (15, 20)]
    assert _request_groups([3, 15, 2], 15) == [(0, 3), (3, 18), (18, 20)]


def test_verify_of_more_rows_than_a_step_takes_runs_in_groups():
    """12 requests x 5 draft tokens (60 rows, above the plans' 47 or 15): the verify runs in groups
    of whole requests, each row still bitwise its decode step."""
    model, cfg = gguf_llama(torch.bfloat16, quantized_head=True)
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, 320, (int(n),), generator=g).tolist() for n in torch.randint(3, 20, (12,), generator=g)]
    chains = [torch.randint(3, 320, (5,), generator=g).tolist() for _ in prompts]

    def prefilled():
        return prefilled_with_drafts(model, cfg, torch.bfloat16, prompts, chains)

    h, seqs = prefilled()
    stepwise = []
    for _ in range(5):
        stepwise.append(h.run(h.decode_batch(seqs), seqs))
    expected = torch.stack(stepwise, 1).reshape(len(seqs) * 5, -1)   # request-major, like the verify rows

    h, seqs = prefilled()
    fb = h.extend_batch(seqs, [5] * len(seqs), all_logits=True)
    fb.spec_verify = True
    assert fb.num_tokens > h.runner.max_batch and h.runner.can_run(fb)
    got = h.runner.replay(fb)
    bad = [i for i in range(got.shape[0]) if not torch.equal(got[i], expected[i])]
    assert not bad, (bad, (got - expected).abs().max())
