"""The C++ CPU layer kernels (kvyard.kernels.cpu_ops) against the layers' torch paths, and the rule in
kvyard.kernels that picks them (CPU, float32/bfloat16, at most CPU_KERNEL_MAX_ROWS rows).

Exactness: RMSNorm (its squares summed by ATen's own sum kernel) and the KV write are bitwise the
torch path's. Rotary and silu are bitwise on the AVX2 machine they were written on (the rotary
add is one fma, as ATen's AVX2 addcmul; silu calls the Sleef exp ATen's AVX2 kernel uses); on
another ISA ATen's kernels may round differently, so those two are checked to one unit in the
last place (ONE_ULP).
"""
import pytest
import torch

from kvyard import kernels
from kvyard.kernels import cpu_ops
from kvyard.kernels import cpu_kernels_disabled, use_cpu_kernel
from kvyard.layers.activation import SiluAndMul
from kvyard.layers.norm import RMSNorm
from kvyard.layers.rotary import RotaryEmbedding
from kvyard.mem_cache.kv_pool import KVPool

pytestmark = pytest.mark.skipif(not cpu_ops.available(), reason="no C++ compiler for the CPU ops")
DTYPES = [torch.float32, torch.bfloat16]
ONE_ULP = {torch.float32: dict(rtol=2.4e-7, atol=1e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


def torch_and_kernel(fn):
    with cpu_kernels_disabled():
        expected = fn()
    return expected, fn()


def test_the_rule_takes_small_cpu_batches_in_float32_or_bfloat16():
    assert use_cpu_kernel("rmsnorm", torch.zeros(kernels.CPU_KERNEL_MAX_ROWS, 8))
    assert use_cpu_kernel("rotary", torch.zeros(1, 2, 8, dtype=torch.bfloat16))
    assert not use_cpu_kernel("rmsnorm", torch.zeros(kernels.CPU_KERNEL_MAX_ROWS + 1, 8))   # prefill
    assert not use_cpu_kernel("rmsnorm", torch.zeros(4, 8, dtype=torch.float16))
    with cpu_kernels_disabled():
        assert not use_cpu_kernel("rmsnorm", torch.zeros(4, 8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 7, 128])   # 1 is a decode step; 128 the largest kernel batch
def test_rmsnorm_with_and_without_residual(dtype, rows):
    gen = torch.Generator().manual_seed(rows)
    norm = RMSNorm(96, eps=1e-5, dtype=dtype)
    norm.weight.copy_(torch.randn(96, generator=gen))
    wide = torch.randn(rows, 200, generator=gen).to(dtype)
    x, residual = wide[:, :96], torch.randn(rows, 96, generator=gen).to(dtype)   # x has a row stride
    expected, got = torch_and_kernel(lambda: norm(x, residual))
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    expected, got = torch_and_kernel(lambda: norm(x))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_matches_the_torch_path_on_a_strided_qkv_view(dtype):
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(5, (4 + 2 + 2) * 16, generator=gen).to(dtype)
    qk = qkv[:, :(4 + 2) * 16].view(5, 6, 16)                 # [T, H + Hkv, D] view with a row stride
    angles = torch.randn(5, 1, 8, generator=gen)
    cos = torch.cat([angles.cos()] * 2, -1).to(dtype)
    sin = torch.cat([angles.sin()] * 2, -1).to(dtype)
    expected, got = torch_and_kernel(lambda: RotaryEmbedding.apply(qk, (cos, sin)))
    torch.testing.assert_close(got, expected, **ONE_ULP[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    # d = 100: ends in a tail shorter than one vector
    x = (torch.randn(3, 2 * 100, generator=torch.Generator().manual_seed(2)) * 4).to(dtype)
    expected, got = torch_and_kernel(lambda: SiluAndMul()(x))
    assert got.shape == (3, 100)
    torch.testing.assert_close(got, expected, **ONE_ULP[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_kv_write_copies_strided_rows_into_their_slots(dtype):
    pool = KVPool(num_slots=12, num_layers=2, num_kv_heads=2, head_dim=8, dtype=dtype, device="cpu")
    qkv = torch.randn(3, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
    k, v = qkv[:, 32:48], qkv[:, 48:]
    loc = torch.tensor([9, 1, 4])
    pool.set_kv(1, loc, k, v)
    assert torch.equal(pool.k_buffer(1)[loc].flatten(1), k) and torch.equal(pool.v_buffer(1)[loc].flatten(1), v)
    untouched = torch.ones(12, dtype=torch.bool)
    untouched[loc] = False
    assert not pool.k_buffer(1)[untouched].any() and not pool.k_buffer(0).any()


def test_bad_inputs_are_clear_errors():
    with pytest.raises(RuntimeError, match="slot 99 out of range"):
        cpu_ops.write_kv(torch.zeros(4, 1, 2), torch.zeros(4, 1, 2), torch.tensor([99]), torch.zeros(1, 2),
                         torch.zeros(1, 2))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        cpu_ops.silu_and_mul(torch.zeros(2, 4, dtype=torch.float64))
