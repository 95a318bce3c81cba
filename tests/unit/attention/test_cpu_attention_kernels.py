"""The C++ paged decode kernel vs a dense reference: GQA ratios 1/3/8, head dims 64/96/128,
float32 and bfloat16 pools, scattered slots, a padded row on the dummy slot."""
import pytest
import torch

from kvyard_plugins.attention import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="CPU attention kernels do not build")

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def dense(q, k, v, scale):
    """q [H, D], k/v [L, Hkv, D] -> [H, D] in float32."""
    group = q.shape[0] // k.shape[1]
    k, v = k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
    probs = (torch.einsum("hd,lhd->hl", q.float(), k) * scale).softmax(-1)
    return torch.einsum("hl,lhd->hd", probs, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("head_dim", [64, 96, 128])   # 64, 128: the blocked AVX2 path; 96: the generic loop
def test_paged_decode_matches_dense(dtype, group, head_dim):
    torch.manual_seed(group + head_dim)
    kv_heads, slots = 2, 400
    heads = kv_heads * group
    k_pool = torch.randn(slots, kv_heads, head_dim).to(dtype)
    v_pool = torch.randn(slots, kv_heads, head_dim).to(dtype)
    k_pool[0] = v_pool[0] = 0                                   # the dummy slot
    lengths = [1, 37, 120, 0]                                   # 0: a padded row
    table = torch.zeros(len(lengths) + 1, 128, dtype=torch.int32)
    order = (torch.randperm(slots - 1) + 1).int()
    used = 0
    for row, n in enumerate(lengths[:3], start=1):
        table[row, :n] = order[used:used + n]
        used += n
    rows = torch.tensor([1, 2, 3, 0])
    q = torch.randn(len(lengths), heads, head_dim).to(dtype)
    scale = head_dim ** -0.5
    out = cpu_kernels.paged_decode(q, k_pool, v_pool, table, rows, torch.tensor(lengths), scale)
    assert out.dtype == dtype and out.shape == q.shape
    for b, n in enumerate(lengths):
        picked = table[rows[b], :max(n, 1)].long()
        expected = dense(q[b], k_pool[picked], v_pool[picked], scale)
        torch.testing.assert_close(out[b].float(), expected, **TOL[dtype])


def test_paged_decode_rejects_bad_shapes():
    q = torch.randn(2, 3, 8)
    pool = torch.randn(10, 2, 8)
    with pytest.raises(RuntimeError, match="multiple of Hkv"):
        cpu_kernels.paged_decode(q, pool, pool, torch.zeros(3, 4, dtype=torch.int32),
                                 torch.tensor([1, 2]), torch.tensor([1, 1]), 1.0)
    with pytest.raises(RuntimeError, match="int32"):
        cpu_kernels.paged_decode(torch.randn(2, 4, 8), pool, pool, torch.zeros(3, 4, dtype=torch.int64),
                                 torch.tensor([1, 2]), torch.tensor([1, 1]), 1.0)
