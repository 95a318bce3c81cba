"""The `flashinfer` attention plugin with the real library on a CUDA device (skipped elsewhere).

Kernel level (bfloat16, head dims 64 and 128, page sizes 1 and 16, GQA groups 1, 3 and 4 — group
4 takes the tensor-core decode kernel): flashinfer vs torch_native on the same paged pool for
extend steps on cached prefixes and for decode steps, eagerly and through a captured CUDA graph
(decode, and the speculative verify step's padded extend)
replayed on a different batch. Tolerance: both round a float32 accumulation to bf16, so outputs
of O(1) differ by a few bf16 ulps; 3e-2 max abs.

Engine level: a tiny random Llama (head_dim 64) through kvyard.Engine(attention_backend=
"flashinfer", dtype="bfloat16") with CUDA graphs on and off, chunked prefill, radix-cache hits and
page size 16, against transformers in bfloat16 on the same GPU. bf16 logits of two correct
implementations differ by rounding (about 0.1 here), so the check is teacher-forced:
transformers scores kvyard's own continuation, and every token kvyard chose must be transformers'
argmax or within MARGIN of it (a near-tie that rounding can flip). A wrong attention kernel moves
the logits by their whole spread (std about 9) and picks tokens far below the argmax.
"""
from __future__ import annotations

import random
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from gpu_guard import require_gpu

require_gpu(triton=False)
pytest.importorskip("flashinfer")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from forward_harness import Harness, PagedKV, Seq  # noqa: E402
from kvyard.layers.attention import Attention  # noqa: E402
from kvyard_plugins.attention.flashinfer_backend import FlashInferBackend  # noqa: E402
from kvyard_plugins.attention.torch_native_backend import TorchNativeBackend  # noqa: E402

DEV = "cuda"
DTYPE = torch.bfloat16
KV_HEADS = 2
TOL = 3e-2
MARGIN = 0.5        # logits; the tiny model's lm_head is scaled so logits have a std of about 9


# -- kernel level ----------------------------------------------------------------------------------
def make_pair(kv: PagedKV, heads: int, dim: int):
    cfg = kv.backend_config(heads, dim)
    return FlashInferBackend(cfg), TorchNativeBackend(cfg)


def add_request(kv: PagedKV, cached: int, new: int, heads: int, dim: int):
    seq = Seq(kv.new_row(), list(range(cached + new)), kv_len=cached)
    if cached:
        loc = kv.allocate(seq.row, 0, cached)
        for layer in range(kv.pool.num_layers):
            kv.pool.set_kv(layer, loc, torch.randn(cached, KV_HEADS, dim, device=DEV, dtype=DTYPE),
                           torch.randn(cached, KV_HEADS, dim, device=DEV, dtype=DTYPE))
    q, k, v = (torch.randn(new, h, dim, device=DEV, dtype=DTYPE) for h in (heads, KV_HEADS, KV_HEADS))
    return seq, q, k, v


def attend(backend, fb, layer, q, k, v):
    fb.attn_backend = backend
    backend.init_forward_metadata(fb)
    return layer(q.flatten(1), k.flatten(1), v.flatten(1), fb)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all()
    return (a.float() - b.float()).abs().max().item()


def capture_graph(step):
    """(a CUDA graph of ``step``, its output), after one warm-up run on a side stream."""
    from kvyard.executor.cuda_graph_runner import CudaGraphCapture

    graph = CudaGraphCapture(warmup_runs=1)
    return graph, graph.capture(step)


GRID = [(1, 1, 64), (16, 3, 64), (16, 4, 128), (1, 4, 128), (16, 1, 128)]  # (page, group, head_dim)
GRID_IDS = [f"flashinfer-page{p}-group{g}-dim{d}" for p, g, d in GRID]   # tests/gpu/summarize.py groups by plugin


@pytest.mark.parametrize("page_size,group,dim", GRID, ids=GRID_IDS)
def test_extend_on_cached_prefixes_matches_torch_native(page_size, group, dim):
    torch.manual_seed(page_size + group + dim)
    heads = KV_HEADS * group
    kv = PagedKV(num_layers=2, num_kv_heads=KV_HEADS, head_dim=dim, num_pages=4096 // page_size,
                 page_size=page_size, max_reqs=16, max_context=2048, dtype=DTYPE, device=DEV, seed=dim)
    flash, native = make_pair(kv, heads, dim)
    shapes = [(0, 9), (1, 7), (17, 5), (20, 1), (33, 300), (0, 1000), (500, 64)]   # (cached, new)
    reqs = [add_request(kv, c, n, heads, dim) for c, n in shapes]
    fb = Harness(model=None, backend=flash, kv=kv).extend_batch([r[0] for r in reqs], [n for _, n in shapes])
    q, k, v = (torch.cat([r[i] for r in reqs]) for i in (1, 2, 3))
    layer = Attention(layer_id=1, num_heads=heads, num_kv_heads=KV_HEADS, head_dim=dim)
    got = attend(flash, fb, layer, q, k, v)
    want = attend(native, fb, layer, q, k, v)
    assert max_err(got, want) < TOL


@pytest.mark.parametrize("page_size,group,dim", GRID, ids=GRID_IDS)
def test_decode_matches_torch_native(page_size, group, dim):
    torch.manual_seed(3 * page_size + group + dim)
    heads = KV_HEADS * group
    kv = PagedKV(num_layers=1, num_kv_heads=KV_HEADS, head_dim=dim, num_pages=8192 // page_size,
                 page_size=page_size, max_reqs=32, max_context=4096, dtype=DTYPE, device=DEV, seed=dim + 1)
    flash, native = make_pair(kv, heads, dim)
    lengths = [1, 15, 16, 17, 100, 1000, 3000] + [random.Random(i).randrange(1, 400) for i in range(9)]
    reqs = [add_request(kv, n, 1, heads, dim) for n in lengths]
    fb = Harness(model=None, backend=flash, kv=kv).decode_batch([r[0] for r in reqs])
    q, k, v = (torch.cat([r[i] for r in reqs]) for i in (1, 2, 3))
    layer = Attention(layer_id=0, num_heads=heads, num_kv_heads=KV_HEADS, head_dim=dim)
    assert max_err(attend(flash, fb, layer, q, k, v), attend(native, fb, layer, q, k, v)) < TOL


@pytest.mark.parametrize("page_size,group", [(1, 3), (16, 4)], ids=["flashinfer-page1", "flashinfer-page16"])
def test_decode_graph_replays_a_new_batch(page_size, group):
    """Capture one layer's decode for a padded bucket of 8, replay it on other requests."""
    torch.manual_seed(11 + page_size)
    heads, dim, bucket = KV_HEADS * group, 64, 8
    kv = PagedKV(num_layers=1, num_kv_heads=KV_HEADS, head_dim=dim, num_pages=4096 // page_size,
                 page_size=page_size, max_reqs=32, max_context=1024, dtype=DTYPE, device=DEV)
    flash, native = make_pair(kv, heads, dim)
    flash.init_cuda_graph_state(16)
    layer = Attention(layer_id=0, num_heads=heads, num_kv_heads=KV_HEADS, head_dim=dim)
    harness = Harness(model=None, backend=flash, kv=kv)
    static = {name: torch.zeros(bucket, *shape, device=DEV, dtype=DTYPE)
              for name, shape in (("q", (heads, dim)), ("k", (KV_HEADS, dim)), ("v", (KV_HEADS, dim)))}
    rows = torch.zeros(bucket, dtype=torch.int64, device=DEV)
    lens = torch.ones(bucket, dtype=torch.int64, device=DEV)
    locs = torch.zeros(bucket, dtype=torch.int64, device=DEV)

    def fill(lengths):
        """Load a decode batch into the static inputs, padded with the dummy row; its fb."""
        reqs = [add_request(kv, n, 1, heads, dim) for n in lengths]
        fb = harness.decode_batch([r[0] for r in reqs])
        b = len(reqs)
        for name, i in (("q", 1), ("k", 2), ("v", 3)):
            static[name].zero_()
            static[name][:b] = torch.cat([r[i] for r in reqs])
        rows.zero_(); rows[:b] = fb.req_pool_indices
        lens.fill_(1); lens[:b] = fb.seq_lens
        locs.zero_(); locs[:b] = fb.out_cache_loc
        return replace(fb, batch_size=bucket, req_pool_indices=rows, seq_lens=lens, out_cache_loc=locs,
                       seq_lens_cpu=fb.seq_lens_cpu + [1] * (bucket - b)), b

    fb, _ = fill([3, 50])
    flash.init_forward_metadata_capture(fb)

    def step():
        return layer(static["q"].flatten(1), static["k"].flatten(1), static["v"].flatten(1), fb)

    graph, out = capture_graph(step)

    for lengths in ([700, 5, 64, 31, 2], [1, 1, 900, 17, 300, 45, 8, 600]):
        replay_fb, b = fill(lengths)
        replay_fb.attn_backend = flash
        flash.init_forward_metadata_replay(replay_fb)
        graph.replay()
        torch.cuda.synchronize()
        want = attend(native, replay_fb, layer, static["q"], static["k"], static["v"])
        assert max_err(out[:b], want[:b]) < TOL, f"replay of {lengths}"


@pytest.mark.parametrize("page_size,group", [(1, 3), (16, 4)], ids=["flashinfer-page1", "flashinfer-page16"])
def test_extend_graph_replays_a_padded_verify_batch(page_size, group):
    """Capture one layer's extend of W = 4 tokens per request for a bucket of 4 (the speculative
    verify layout, kvyard.executor.extend_graph_runner), replay it on other requests with 1..4 new
    tokens each: the real rows equal torch_native on the unpadded batch."""
    from kvyard.executor.extend_graph_runner import ExtendInputBuffers, ExtendLayout

    torch.manual_seed(21 + page_size)
    heads, dim, bucket, width = KV_HEADS * group, 64, 4, 4
    kv = PagedKV(num_layers=1, num_kv_heads=KV_HEADS, head_dim=dim, num_pages=4096 // page_size,
                 page_size=page_size, max_reqs=32, max_context=1024, dtype=DTYPE, device=DEV)
    flash, native = make_pair(kv, heads, dim)
    flash.init_extend_graph_state(bucket, width)
    layer = Attention(layer_id=0, num_heads=heads, num_kv_heads=KV_HEADS, head_dim=dim)
    buffers = ExtendInputBuffers(bucket, width, DEV)
    graph_fb = buffers.batch(bucket, kv.pool, kv.req_to_token, flash)
    rows = bucket * width
    static = {name: torch.zeros(rows, h, dim, device=DEV, dtype=DTYPE)
              for name, h in (("q", heads), ("k", KV_HEADS), ("v", KV_HEADS))}
    flash.init_forward_metadata_capture(graph_fb)

    def step():
        return layer(static["q"].flatten(1), static["k"].flatten(1), static["v"].flatten(1), graph_fb)

    graph, out = capture_graph(step)

    for shapes in ([(300, 4), (5, 2)], [(17, 1), (64, 4), (900, 3), (2, 4)]):
        reqs = [add_request(kv, c, n, heads, dim) for c, n in shapes]
        fb = Harness(model=None, backend=flash, kv=kv).extend_batch([r[0] for r in reqs], [n for _, n in shapes])
        layout = ExtendLayout(fb, width, bucket)
        dest = buffers.fill(fb, layout, kv.req_to_token)
        for name, i in (("q", 1), ("k", 2), ("v", 3)):
            static[name].zero_()
            static[name][dest] = torch.cat([r[i] for r in reqs])
        graph_fb.extend_prefix_lens_cpu = layout.prefix
        graph_fb.seq_lens_cpu = [p + width for p in layout.prefix]
        flash.init_forward_metadata_replay(graph_fb)
        graph.replay()
        torch.cuda.synchronize()
        want = attend(native, fb, layer, *(torch.cat([r[i] for r in reqs]) for i in (1, 2, 3)))
        assert max_err(out[dest], want) < TOL, f"replay of {shapes}"


# -- engine level ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random Llama with head_dim 64 and GQA group 4, lm_head scaled so logits are O(10)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=3, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    path = tmp_path_factory.mktemp("tiny-llama-fi")
    model.save_pretrained(path)
    return str(path), model.to(device=DEV, dtype=DTYPE)


def near_argmax_violations(hf_model, prompt: list[int], output: list[int]) -> list[tuple[int, float]]:
    """(step, margin) wherever kvyard's token is more than MARGIN below transformers' argmax,
    with transformers scoring prompt + kvyard's own continuation (teacher forcing)."""
    ids = torch.tensor([prompt + output[:-1]], device=DEV)
    with torch.inference_mode():
        logits = hf_model(input_ids=ids).logits[0, len(prompt) - 1:].float()
    chosen = logits.gather(1, torch.tensor(output, device=DEV)[:, None])[:, 0]
    margins = (logits.max(dim=1).values - chosen).tolist()
    return [(i, m) for i, m in enumerate(margins) if m > MARGIN]


ENGINE_CASES = {
    "flashinfer-graphs": dict(),
    "flashinfer-no-graphs-chunked": dict(disable_cuda_graph=True, chunked_prefill_size=16),
    "flashinfer-page16": dict(page_size=16),
}


@pytest.mark.parametrize("case", list(ENGINE_CASES))
def test_engine_greedy_matches_transformers(tiny_llama, case):
    from kvyard import Engine

    path, hf_model = tiny_llama
    rng = random.Random(1)
    base = [rng.randrange(1, 512) for _ in range(40)]
    prompts = [base + [rng.randrange(1, 512) for _ in range(n)] for n in (3, 17, 90, 1, 250, 33)]
    params = {"max_new_tokens": 24, "temperature": 0.0, "ignore_eos": True}
    with Engine(model_path=path, dtype="bfloat16", attention_backend="flashinfer", skip_tokenizer_init=True,
                max_total_tokens=8192, cuda_graph_max_bs=8, log_level="warning",
                **ENGINE_CASES[case]) as engine:
        first = [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=params)]
        again = engine.generate(input_ids=prompts[::-1], sampling_params=params)   # radix-cache hits
        assert all(o["meta_info"]["cached_tokens"] > 0 for o in again)
    for prompt, out in zip(prompts, first):
        assert len(out) == 24
        assert near_argmax_violations(hf_model, prompt, out) == []
    for prompt, out in zip(prompts[::-1], again):
        assert near_argmax_violations(hf_model, prompt, out["output_ids"]) == []
