"""The fused Triton layer kernels (kvyard.kernels.triton_ops) equal the layers' torch paths, run in the
Triton CPU interpreter; and kvyard.kernels picks between them in one place.

Tolerances: float32 1e-5 (only the order of a row's summation differs); bfloat16 one unit in the
last place (rtol 1.6e-2, atol 1e-2): the kernels compute in float32 and round once where the
torch path may round an intermediate product, and the interpreter rounds float32 -> bfloat16
toward zero where a GPU rounds to nearest.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported anywhere in this process

import pytest
import torch

from kvyard import kernels
from kvyard.kernels import force_triton, use_triton
from kvyard.layers.activation import SiluAndMul
from kvyard.layers.norm import RMSNorm
from kvyard.layers.rotary import RopeConfig, RotaryEmbedding
from kvyard.mem_cache.kv_pool import KVPool

pytest.importorskip("triton")

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}
DTYPES = [torch.float32, torch.bfloat16]


def both_paths(op: str, fn):
    """(torch result, triton result) of fn() — the same call with the op routed each way."""
    with force_triton(()):
        expected = fn()
    with force_triton((op,)):
        got = fn()
    return expected, got


# -- the dispatch rule ---------------------------------------------------------------------
def test_cpu_tensors_take_torch_unless_forced(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.setattr(kernels, "_override", None)
    assert not any(use_triton(op, x) for op in kernels.OPS)
    with force_triton(("rmsnorm",)):
        assert use_triton("rmsnorm", x) and not use_triton("rotary", x)
    monkeypatch.setenv("TRITON_INTERPRET", "0")   # forced, but no interpreter: still torch
    with force_triton(("rmsnorm",)):
        assert not use_triton("rmsnorm", x)


def test_cuda_device_takes_triton_by_default(monkeypatch):
    monkeypatch.setattr(kernels, "_override", None)
    assert use_triton("silu_and_mul", "cuda") == kernels.triton_available()
    assert not use_triton("silu_and_mul", "cpu")


def test_bad_op_names_are_one_line_errors():
    with pytest.raises(ValueError, match="op must be one of"):
        use_triton("softmax", "cpu")
    with pytest.raises(ValueError, match="KVYARD_TRITON_OPS: unknown op"):
        kernels._parse_ops("rmsnorm,gelu")
    assert kernels._parse_ops("all") == frozenset(kernels.OPS)
    assert kernels._parse_ops("none") == frozenset()
    assert kernels._parse_ops("") is None


# -- RMSNorm ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 64), (5, 96), (3, 1000)])
def test_rmsnorm_with_and_without_residual(rows, hidden, dtype):
    torch.manual_seed(rows + hidden)
    norm = RMSNorm(hidden, eps=1e-5, dtype=dtype)
    norm.weight.data.copy_(torch.randn(hidden))
    x, residual = torch.randn(rows, hidden, dtype=dtype) * 3, torch.randn(rows, hidden, dtype=dtype)

    expected, got = both_paths("rmsnorm", lambda: norm(x))
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got, expected, **TOL[dtype])

    (exp_normed, exp_sum), (normed, summed) = both_paths("rmsnorm", lambda: norm(x, residual))
    torch.testing.assert_close(summed, exp_sum, **TOL[dtype])
    torch.testing.assert_close(normed, exp_normed, **TOL[dtype])


def test_rmsnorm_on_a_strided_3d_input():
    torch.manual_seed(0)
    norm = RMSNorm(32)
    x = torch.randn(4, 3, 64)[..., :32]           # rows are not contiguous
    expected, got = both_paths("rmsnorm", lambda: norm(x))
    torch.testing.assert_close(got, expected, **TOL[torch.float32])


# -- SiLU and mul ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2 * 16), (7, 2 * 200), (2, 3, 2 * 1500)])
def test_silu_and_mul(shape, dtype):
    torch.manual_seed(sum(shape))
    x = torch.randn(shape, dtype=dtype) * 4
    expected, got = both_paths("silu_and_mul", lambda: SiluAndMul()(x))
    assert got.shape == (*shape[:-1], shape[-1] // 2)
    torch.testing.assert_close(got, expected, **TOL[dtype])


# -- rotary ----------------------------------------------------------------------------------
ROPES = {
    "default": RopeConfig(head_dim=64, max_position=256, theta=10000.0),
    "llama3": RopeConfig(head_dim=128, max_position=256, theta=500000.0, rope_type="llama3",
                         scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 32}),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rope", sorted(ROPES))
def test_rotary_on_the_qk_columns_of_a_fused_qkv(rope, dtype):
    cfg = ROPES[rope]
    torch.manual_seed(cfg.head_dim)
    rotary = RotaryEmbedding(cfg, dtype=dtype)
    heads, kv_heads, t, d = 6, 2, 9, cfg.head_dim
    qkv = torch.randn(t, (heads + 2 * kv_heads) * d, dtype=dtype)
    qk = qkv[:, :(heads + kv_heads) * d].view(t, heads + kv_heads, d)    # strided rows
    positions = torch.tensor([0, 1, 2, 31, 32, 33, 100, 200, 255])
    cos_sin = rotary.lookup(positions)
    expected, got = both_paths("rotary", lambda: RotaryEmbedding.apply(qk, cos_sin))
    assert got.shape == qk.shape and got.dtype == dtype
    torch.testing.assert_close(got, expected, **TOL[dtype])


# -- KV-cache write --------------------------------------------------------------------------
@pytest.mark.parametrize("pool_dtype,act_dtype", [(torch.float32, torch.float32),
                                                  (torch.bfloat16, torch.bfloat16),
                                                  (torch.bfloat16, torch.float32),
                                                  (torch.float8_e4m3fn, torch.bfloat16),
                                                  (torch.float8_e5m2, torch.bfloat16)])
def test_kv_write_scatters_rows_into_slots(pool_dtype, act_dtype):
    """fp8 pools: k / 0.004 saturates (the clamp), v / 3; tiny values round to subnormals and -0;
    the kernel's bits equal the torch expression's."""
    torch.manual_seed(1)
    kv_heads, d, t = 3, 64, 11
    fp8 = pool_dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    scales = ([1.0, 0.004], [1.0, 3.0]) if fp8 else None
    pools = [KVPool(40, 2, kv_heads, d, pool_dtype, "cpu", scales=scales) for _ in range(2)]
    loc = torch.randperm(39)[:t] + 1                       # scattered, never the dummy slot 0
    qkv = torch.randn(t, 8 * kv_heads * d, dtype=act_dtype) * (4 if fp8 else 1)
    qkv[:, :20] *= 1e-5
    k = qkv[:, :kv_heads * d].view(t, kv_heads, d)          # strided rows, as a model passes them
    v = qkv[:, -kv_heads * d:].view(t, kv_heads, d)
    with force_triton(()):
        pools[0].set_kv(1, loc, k, v)
    with force_triton(("kv_write",)):
        pools[1].set_kv(1, loc, k, v)
    for a, b in ((pools[0].k_buffer(1), pools[1].k_buffer(1)), (pools[0].v_buffer(1), pools[1].v_buffer(1))):
        if fp8:
            assert torch.equal(b.view(torch.uint8), a.view(torch.uint8))
            continue
        exact = dict(rtol=0, atol=0) if pool_dtype == act_dtype else TOL[pool_dtype]  # a cast rounds
        torch.testing.assert_close(b, a, **exact)
    assert pools[1].k_buffer(0).float().abs().sum() == 0   # other layers untouched


@pytest.mark.parametrize("pool_dtype,act_dtype", [(torch.float32, torch.float32),
                                                  (torch.bfloat16, torch.bfloat16),
                                                  (torch.float8_e4m3fn, torch.bfloat16)])
def test_rotary_with_the_kv_write_folded_in_equals_the_two_launches(pool_dtype, act_dtype):
    """KVPool.store_rotated (one launch) against RotaryEmbedding.apply then set_kv (two): the
    same rotated q / k bits returned, the same bits in both pools (fp8: scaled, saturated)."""
    torch.manual_seed(2)
    hq, hkv, d, t = 6, 2, 32, 9
    fp8 = pool_dtype == torch.float8_e4m3fn
    scales = ([1.0, 0.01], [1.0, 2.0]) if fp8 else None
    pools = [KVPool(30, 2, hkv, d, pool_dtype, "cpu", scales=scales) for _ in range(2)]
    loc = torch.randperm(29)[:t] + 1
    qkv = torch.randn(t, (hq + 2 * hkv) * d, dtype=act_dtype) * (4 if fp8 else 1)
    qk = qkv[:, :(hq + hkv) * d].view(t, hq + hkv, d)
    v = qkv[:, (hq + hkv) * d:].view(t, hkv, d)
    rope = RotaryEmbedding(RopeConfig(head_dim=d, max_position=64, theta=10000.0), dtype=act_dtype)
    cos_sin = rope.lookup(torch.randint(0, 64, (t,)))
    with force_triton(("rotary", "kv_write")):
        expected = RotaryEmbedding.apply(qk, cos_sin)
        pools[0].set_kv(1, loc, expected[:, hq:], v)
        got = pools[1].store_rotated(1, loc, qk, v, cos_sin)
    assert torch.equal(got, expected)
    for a, b in ((pools[0].k_buffer(1), pools[1].k_buffer(1)), (pools[0].v_buffer(1), pools[1].v_buffer(1))):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    with force_triton(("rotary",)):           # the KV-write op off: the caller does both
        assert pools[1].store_rotated(1, loc, qk, v, cos_sin) is None


# -- every fused op inside a model ----------------------------------------------------------------
def test_tiny_llama_with_every_fused_op_matches_the_torch_path(monkeypatch):
    import transformers
    from forward_harness import Harness, PagedKV
    from kvyard.model_base import ModelBuildContext
    from kvyard.plugins import PluginManager
    import kvyard_plugins.attention.torch_native as torch_native_plugin
    import kvyard_plugins.models.llama as llama_plugin

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                   num_key_value_heads=2, num_hidden_layers=2, vocab_size=128,
                                   max_position_embeddings=128, initializer_range=0.1,
                                   rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    hf = transformers.LlamaForCausalLM(cfg).eval()
    pm = PluginManager(autoload=False)
    pm.add_plugin(llama_plugin)
    pm.add_plugin(torch_native_plugin)
    model = pm.registry("model_architectures").get("LlamaForCausalLM")(cfg, ModelBuildContext(torch.float32, "cpu"))
    model.load_weights(hf.state_dict().items())

    def generate():
        kv = PagedKV(2, 2, 16, num_pages=64, page_size=1)
        backend = pm.registry("attention_backends").get("torch_native")(kv.backend_config(4, 16))
        return Harness(model, backend, kv).generate([[5, 9, 2, 7], list(range(3, 14))], steps=3)

    with force_triton(()):
        expected = generate()
    calls = count_fused_calls(monkeypatch)
    with force_triton(kernels.OPS):
        got = generate()
    # per step: 2 layers x (2 norms, rotary with the kv write, silu) + the final norm
    assert calls == {"rmsnorm": 3 * 5, "rotate_and_store": 3 * 2, "apply_rotary": 0, "write_kv": 0,
                     "silu_and_mul": 3 * 2}
    assert got.tokens == expected.tokens
    for a, b in zip(got.logits, expected.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def count_fused_calls(monkeypatch) -> dict:
    """Counts the calls of each fused-kernel entry point (the layers import them per call)."""
    from kvyard.kernels.triton_ops import activation, kv_write, rmsnorm, rotary

    calls = {}
    for module, name in ((rmsnorm, "rmsnorm"), (rotary, "apply_rotary"), (rotary, "rotate_and_store"),
                         (kv_write, "write_kv"), (activation, "silu_and_mul")):
        original = getattr(module, name)
        calls[name] = 0

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    return calls
