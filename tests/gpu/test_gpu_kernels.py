"""Kernel-level correctness on a CUDA device (skipped elsewhere): the same checks the CPU suite
runs under the Triton interpreter, compiled for the GPU.

  * attention plugins triton and flex_attention (compiled) and torch_native over the paged pool vs
    dense float64 attention: page sizes 1/16, GQA 1/3/8, head dims 64/128, float32/bfloat16,
    mixed prefixes (0, 1, across a page boundary) in one batch;
  * the triton decode step through a real torch.cuda.CUDAGraph (CudaGraphRunner) replayed on
    batches padded to the bucket, vs the eager step;
  * the fused layer kernels (kvyard.kernels.triton_ops) vs the torch paths.
Tolerances (max abs, outputs O(1)): float32 2e-5 (IEEE float32 dots), bfloat16 2e-2.
"""
from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import pytest
import torch

from gpu_guard import require_gpu

require_gpu()
pytest.importorskip("triton")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from attention_reference import dense_attention  # noqa: E402
from forward_harness import Harness, PagedKV, Seq  # noqa: E402
from kvyard import kernels  # noqa: E402
from kvyard.executor.cuda_graph_runner import CudaGraphConfig, CudaGraphCapture, CudaGraphRunner  # noqa: E402
from kvyard.layers.activation import SiluAndMul  # noqa: E402
from kvyard.layers.attention import Attention  # noqa: E402
from kvyard.layers.norm import RMSNorm  # noqa: E402
from kvyard.layers.rotary import RopeConfig, RotaryEmbedding  # noqa: E402
from kvyard.mem_cache.kv_pool import KVPool  # noqa: E402
from kvyard.plugins import registry  # noqa: E402

DEV = "cuda"
KV_HEADS = 2
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
BACKENDS = ["triton", "flex_attention", "torch_native"]
EXTEND_SHAPES = [(0, 9), (1, 7), (17, 5), (20, 1), (30, 70), (0, 200)]
DECODE_LENGTHS = [1, 17, 6, 33, 130, 700]


def make_backend(name: str, kv: PagedKV, heads: int, dim: int, **options):
    cfg = kv.backend_config(heads, dim)
    return registry("attention_backends").get(name)(type(cfg)(**{**cfg.__dict__, "options": options}))


def new_request(kv, layer_id, cached, new, heads, dim, dtype):
    seq = Seq(kv.new_row(), list(range(cached + new)), kv_len=cached)
    k_all, v_all = (torch.randn(cached + new, KV_HEADS, dim, device=DEV).to(dtype) for _ in range(2))
    if cached:
        kv.pool.set_kv(layer_id, kv.allocate(seq.row, 0, cached), k_all[:cached], v_all[:cached])
    return seq, torch.randn(new, heads, dim, device=DEV).to(dtype), k_all, v_all


def max_err(out, expected) -> float:
    assert torch.isfinite(out).all()
    return (out.double().cpu() - expected).abs().max().item()


GRID = list(itertools.product([1, 16], [1, 3, 8], [64, 128], [torch.float32, torch.bfloat16]))
# flex_attention recompiles per head count / dtype (tens of seconds each): a subset covering each axis
FLEX_GRID = [(1, 1, 64, torch.float32), (16, 3, 128, torch.float32), (16, 8, 64, torch.bfloat16),
             (1, 3, 128, torch.bfloat16)]
CASES = [(b, *case) for b in BACKENDS for case in (FLEX_GRID if b == "flex_attention" else GRID)]


@pytest.mark.parametrize("backend_name,page_size,group,dim,dtype", CASES)
def test_extend_matches_dense(backend_name, page_size, group, dim, dtype):
    torch.manual_seed(page_size + group + dim)
    heads = KV_HEADS * group
    kv = PagedKV(2, KV_HEADS, dim, num_pages=2048 // page_size, page_size=page_size, max_context=1024,
                 dtype=dtype, device=DEV, seed=page_size)
    backend = make_backend(backend_name, kv, heads, dim)
    layer = Attention(layer_id=1, num_heads=heads, num_kv_heads=KV_HEADS, head_dim=dim)
    reqs = [new_request(kv, 1, p, n, heads, dim, dtype) for p, n in EXTEND_SHAPES]
    fb = Harness(model=None, backend=backend, kv=kv).extend_batch([r[0] for r in reqs], [n for _, n in EXTEND_SHAPES])
    backend.init_forward_metadata(fb)
    q = torch.cat([r[1] for r in reqs])
    k_new = torch.cat([r[2][p:] for (p, _), r in zip(EXTEND_SHAPES, reqs)])
    v_new = torch.cat([r[3][p:] for (p, _), r in zip(EXTEND_SHAPES, reqs)])
    out = layer(q.flatten(1), k_new.flatten(1), v_new.flatten(1), fb)
    expected = torch.cat([dense_attention(r[1], r[2], r[3], p) for (p, _), r in zip(EXTEND_SHAPES, reqs)])
    assert max_err(out, expected) < TOL[dtype]


@pytest.mark.parametrize("backend_name,page_size,group,dim,dtype", CASES)
def test_decode_matches_dense(backend_name, page_size, group, dim, dtype):
    torch.manual_seed(page_size * 3 + group + dim)
    heads = KV_HEADS * group
    kv = PagedKV(1, KV_HEADS, dim, num_pages=4096 // page_size, page_size=page_size, max_context=1024,
                 dtype=dtype, device=DEV, seed=page_size + 1)
    backend = make_backend(backend_name, kv, heads, dim)
    layer = Attention(layer_id=0, num_heads=heads, num_kv_heads=KV_HEADS, head_dim=dim)
    reqs = [new_request(kv, 0, n, 1, heads, dim, dtype) for n in DECODE_LENGTHS]
    fb = Harness(model=None, backend=backend, kv=kv).decode_batch([r[0] for r in reqs])
    backend.init_forward_metadata(fb)
    q = torch.cat([r[1] for r in reqs])
    out = layer(q.flatten(1), torch.stack([r[2][-1] for r in reqs]).flatten(1),
                torch.stack([r[3][-1] for r in reqs]).flatten(1), fb)
    expected = torch.cat([dense_attention(r[1], r[2], r[3], n) for n, r in zip(DECODE_LENGTHS, reqs)])
    assert max_err(out, expected) < TOL[dtype]


@pytest.mark.parametrize("splits,reduce_in_fp32", [(1, False), (8, False), (16, True)])
def test_triton_decode_options(splits, reduce_in_fp32):
    torch.manual_seed(splits)
    dtype, dim, heads = torch.bfloat16, 128, 3 * KV_HEADS
    kv = PagedKV(1, KV_HEADS, dim, num_pages=256, page_size=16, max_context=2048, dtype=dtype, device=DEV)
    backend = make_backend("triton", kv, heads, dim, triton_attention_num_kv_splits=splits,
                           triton_attention_reduce_in_fp32=reduce_in_fp32)
    layer = Attention(layer_id=0, num_heads=heads, num_kv_heads=KV_HEADS, head_dim=dim)
    lengths = [3, 1000, 64]
    reqs = [new_request(kv, 0, n, 1, heads, dim, dtype) for n in lengths]
    fb = Harness(model=None, backend=backend, kv=kv).decode_batch([r[0] for r in reqs])
    backend.init_forward_metadata(fb)
    out = layer(torch.cat([r[1] for r in reqs]).flatten(1), torch.stack([r[2][-1] for r in reqs]).flatten(1),
                torch.stack([r[3][-1] for r in reqs]).flatten(1), fb)
    expected = torch.cat([dense_attention(r[1], r[2], r[3], n) for n, r in zip(lengths, reqs)])
    assert max_err(out, expected) < TOL[dtype]


# -- a real CUDA graph ---------------------------------------------------------------------------
def tiny_llama(dtype):
    import transformers

    from kvyard.model_base import ModelBuildContext

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                   num_key_value_heads=2, num_hidden_layers=2, vocab_size=512,
                                   max_position_embeddings=1024, initializer_range=0.1)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    model = registry("model_architectures").get("LlamaForCausalLM")(cfg, ModelBuildContext(dtype, DEV))
    model.load_weights(hf.state_dict().items())
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_decode_through_cuda_graphs_equals_eager(dtype):
    model = tiny_llama(dtype)
    kv = PagedKV(2, 2, 64, num_pages=64, page_size=16, max_reqs=8, max_context=512, dtype=dtype, device=DEV, seed=3)
    backend = make_backend("triton", kv, 4, 64)
    harness = Harness(model, backend, kv)
    step = lambda fb: model.compute_logits(model(fb.input_ids, fb.positions, fb))  # noqa: E731
    runner = CudaGraphRunner(CudaGraphConfig(batch_sizes=(1, 2, 4, 8)), step, backend, kv.pool,
                             kv.req_to_token, 8, DEV)
    runner.capture()
    assert all(isinstance(g, CudaGraphCapture) for g in runner.graphs.values())
    seqs = harness.add([[5, 9, 2, 7], list(range(3, 90)), [3, 3], list(range(1, 40)), [7] * 17])
    logits = harness.prefill(seqs, chunk_size=32)
    for step_no in range(6):
        if step_no == 3:
            seqs, logits = seqs[:3], logits[:3]          # 5 rows (bucket 8) -> 3 rows (bucket 4)
        for seq, token in zip(seqs, logits.argmax(-1).tolist()):
            seq.tokens.append(token)
        fb = harness.decode_batch(seqs)
        assert runner.can_run(fb)
        graph_logits = runner.replay(fb).clone()
        logits = harness.run(fb, seqs)
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(graph_logits, logits, rtol=tol, atol=tol)


# -- fused layer kernels -------------------------------------------------------------------------
OP_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


def both_paths(op, fn):
    with kernels.force_triton(()):
        expected = fn()
    with kernels.force_triton((op,)):
        got = fn()
    return expected, got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_layer_kernels_match_torch(dtype):
    torch.manual_seed(0)
    if "KVYARD_TRITON_OPS" not in os.environ:      # the default on CUDA: the fused kernels
        assert all(kernels.use_triton(op, DEV) for op in kernels.OPS)
    norm = RMSNorm(4096, eps=1e-6, dtype=dtype, device=DEV)
    norm.weight.data.normal_()
    x, res = (torch.randn(37, 4096, device=DEV, dtype=dtype) for _ in range(2))
    (e_n, e_s), (g_n, g_s) = both_paths("rmsnorm", lambda: norm(x, res))
    torch.testing.assert_close(g_s, e_s, rtol=0, atol=0)
    torch.testing.assert_close(g_n, e_n, **OP_TOL[dtype])
    gate_up = torch.randn(37, 2 * 11008, device=DEV, dtype=dtype)
    e, g = both_paths("silu_and_mul", lambda: SiluAndMul()(gate_up))
    torch.testing.assert_close(g, e, **OP_TOL[dtype])
    rope = RotaryEmbedding(RopeConfig(head_dim=128, max_position=8192, theta=500000.0, rope_type="llama3",
                                      scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 8192}), dtype=dtype, device=DEV)
    qkv = torch.randn(37, (32 + 16) * 128, device=DEV, dtype=dtype)
    qk = qkv[:, :40 * 128].view(37, 40, 128)
    cos_sin = rope.lookup(torch.randint(0, 8192, (37,), device=DEV))
    e, g = both_paths("rotary", lambda: RotaryEmbedding.apply(qk, cos_sin))
    torch.testing.assert_close(g, e, **OP_TOL[dtype])
    pools = [KVPool(512, 1, 8, 128, dtype, DEV) for _ in range(2)]
    loc = torch.randperm(511, device=DEV)[:37] + 1
    k, v = qkv[:, 32 * 128:40 * 128].view(37, 8, 128), qkv[:, 40 * 128:].view(37, 8, 128)
    with kernels.force_triton(()):
        pools[0].set_kv(0, loc, k, v)
    with kernels.force_triton(("kv_write",)):
        pools[1].set_kv(0, loc, k, v)
    assert torch.equal(pools[0].k_buffer(0), pools[1].k_buffer(0))
    assert torch.equal(pools[0].v_buffer(0), pools[1].v_buffer(0))
    # rotary with the KV write folded in: the bits of the two launches
    pools = [KVPool(512, 1, 8, 128, dtype, DEV) for _ in range(2)]
    with kernels.force_triton(("rotary", "kv_write")):
        expected = RotaryEmbedding.apply(qk, cos_sin)
        pools[0].set_kv(0, loc, expected[:, 32:], v)
        got = pools[1].store_rotated(0, loc, qk, v, cos_sin)
    assert torch.equal(got, expected)
    assert torch.equal(pools[0].k_buffer(0), pools[1].k_buffer(0))
    assert torch.equal(pools[0].v_buffer(0), pools[1].v_buffer(0))
