"""Shared by the quantization tests: tiny random Llama checkpoints, loading one through the
real load path (ModelRunner: config.json -> method -> loader -> model) and greedy generation
with the forward harness."""
from __future__ import annotations

from dataclasses import replace

import torch

from forward_harness import Harness, PagedKV
from kvyard.executor.model_runner import ModelRunner, RunnerConfig
from kvyard.plugins import registry

TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=320, max_position_embeddings=256, initializer_range=0.1,
            eos_token_id=None, bos_token_id=None, pad_token_id=None, tie_word_embeddings=False)

_g = torch.Generator().manual_seed(7)
PROMPTS = [torch.randint(3, 320, (n,), generator=_g).tolist() for n in (9, 23, 5, 14)]


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})).eval()


def runner(path: str, quantization: str | None = None, dtype: str = "float32", **kw) -> ModelRunner:
    return ModelRunner(RunnerConfig(model_path=path, dtype=dtype, quantization=quantization,
                                    max_total_tokens=1024, max_running_requests=8, num_threads=1, **kw))


def harness(model, cfg, attention: str = "torch_native", kv_dtype: torch.dtype = torch.float32,
            options: dict | None = None) -> Harness:
    """``options``: the attention backend's (AttentionConfig.options)."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = PagedKV(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, num_pages=512, dtype=kv_dtype)
    # the activation dtype stays float32 whatever the pool stores (as ModelRunner builds it)
    config = replace(kv.backend_config(cfg.num_attention_heads, head_dim), dtype=torch.float32,
                     options=dict(options or {}))
    backend = registry("attention_backends").get(attention)(config)
    return Harness(model, backend, kv)


def generate(model, cfg, prompts=PROMPTS, steps: int = 16):
    """(greedy tokens per prompt, logits per step [steps][B, vocab])."""
    g = harness(model, cfg).generate(prompts, steps)
    return g.tokens, g.logits


def hf_greedy(hf, prompts=PROMPTS, steps: int = 16):
    """transformers' greedy tokens and the logits of each step, per prompt."""
    out = []
    with torch.inference_mode():
        for p in prompts:
            r = hf.generate(torch.tensor([p]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                            output_logits=True, return_dict_in_generate=True)
            out.append((r.sequences[0, len(p):].tolist(), torch.cat(r.logits).float()))
    return out


def save_tokenizer(path) -> None:
    """ModelConfig reads the eos id from the tokenizer: a tiny one beside the weights."""
    from tiny_tokenizer import build_tokenizer

    build_tokenizer(("<s>", "</s>"), eos="</s>", bos="<s>").save_pretrained(path)


def save_float(hf, path) -> str:
    hf.save_pretrained(path)
    save_tokenizer(path)
    return str(path)


def layer_both_ways(layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the layer's CPU output, its output through the Triton kernels forced onto CPU tensors;
    the caller runs under TRITON_INTERPRET=1)."""
    from kvyard.layers import quantized_linear as ql

    expected = layer(x)
    ql.force_triton(True)
    try:
        return expected, layer(x)
    finally:
        ql.force_triton(False)


def assert_graph_replays(fn, eager: torch.Tensor, times: int = 3) -> None:
    """Captures ``fn`` (a GEMV call on CUDA) in a CUDA graph and replays it ``times`` times: each
    replay gives ``eager``'s bits and leaves every split-K tile counter at 0 (kernels.triton_ops.splitk)."""
    from kvyard.kernels.triton_ops import splitk

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    for _ in range(times):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
        assert not splitk.tile_counters(out.device).any()


def int4_weights(n: int, k: int, group: int, symmetric: bool, dtype: torch.dtype, seed: int):
    """Random canonical int4 weights (qweight [K/8, N], scales [G, N] in ``dtype``, zeros [G, N]
    uint8, sequential g_idx [K]) and the dequantized float64 W [N, K] (the kernels' reference)."""
    from kvyard.layers import quant_math as qm

    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, n), dtype=torch.int32, generator=gen)
    scales = (torch.rand(k // group, n, generator=gen) * 0.5 + 0.01).to(dtype)
    zeros = (torch.full((k // group, n), 8) if symmetric
             else torch.randint(0, 16, (k // group, n), generator=gen)).to(torch.uint8)
    g_idx = torch.arange(k, dtype=torch.int32) // group
    w = (q.double() - zeros.double()[g_idx.long()]) * scales.double()[g_idx.long()]
    return (qm.pack_int4_rows(q), scales, zeros, g_idx), w.t()
