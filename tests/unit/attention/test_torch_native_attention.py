"""torch_native attention over the paged pool vs dense causal attention on unpaged tensors."""
import pytest
import torch

from attention_reference import dense_attention
from forward_harness import Harness, PagedKV, Seq
from kvyard.layers.attention import Attention
from kvyard.plugins import PluginManager
import kvyard_plugins.attention.torch_native as torch_native_plugin

HEAD_DIM = 8
KV_HEADS = 2
# the same code runs on CUDA; those cases run only where a GPU is present
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_backend(kv: PagedKV, heads: int):
    pm = PluginManager(autoload=False)
    pm.add_plugin(torch_native_plugin)
    cls = pm.registry("attention_backends").get("torch_native")
    return cls(kv.backend_config(heads, HEAD_DIM))


def fill_prefix(kv: PagedKV, seq: Seq, k_all, v_all, layer_id: int):
    """Puts the cached part of a sequence into the pool, as earlier steps would have."""
    if seq.kv_len:
        loc = kv.allocate(seq.row, 0, seq.kv_len)
        device = loc.device
        kv.pool.set_kv(layer_id, loc, k_all[:seq.kv_len].to(device), v_all[:seq.kv_len].to(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("page_size", [1, 4])
def test_extend_mixed_prefixes_matches_dense(group, page_size, device):
    torch.manual_seed(group * 10 + page_size)
    heads = KV_HEADS * group
    kv = PagedKV(num_layers=2, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, num_pages=128,
                 page_size=page_size, seed=page_size, device=device)
    backend = make_backend(kv, heads)
    layer = Attention(layer_id=1, num_heads=heads, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    # (prefix cached before this step, new tokens): no prefix, prefix + chunk, prefix + 1 token
    shapes = [(0, 9), (5, 7), (12, 1), (0, 1)]
    seqs, tensors = [], []
    for prefix, new in shapes:
        seq = Seq(kv.new_row(), list(range(prefix + new)), kv_len=prefix)
        k_all, v_all = torch.randn(prefix + new, KV_HEADS, HEAD_DIM), torch.randn(prefix + new, KV_HEADS, HEAD_DIM)
        fill_prefix(kv, seq, k_all, v_all, layer.layer_id)
        seqs.append(seq)
        tensors.append((torch.randn(new, heads, HEAD_DIM), k_all, v_all))

    harness = Harness(model=None, backend=backend, kv=kv)
    fb = harness.extend_batch(seqs, [new for _, new in shapes])
    backend.init_forward_metadata(fb)
    q = torch.cat([t[0] for t in tensors])
    k_new = torch.cat([k[p:] for (p, _), (_, k, _) in zip(shapes, tensors)])
    v_new = torch.cat([v[p:] for (p, _), (_, _, v) in zip(shapes, tensors)])
    out = layer(*(x.flatten(1).to(device) for x in (q, k_new, v_new)), fb)

    expected = torch.cat([dense_attention(q_i, k_i, v_i, p) for (p, _), (q_i, k_i, v_i) in zip(shapes, tensors)])
    assert out.shape == (q.shape[0], heads * HEAD_DIM)
    torch.testing.assert_close(out.cpu().double(), expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(params=["cpu_kernel", "torch_path"])
def decode_path(request, monkeypatch):
    """Decode runs both ways on the CPU: the C++ kernel (where it builds) and the gather path."""
    from kvyard_plugins.attention import cpu_kernels
    if request.param == "cpu_kernel":
        if not cpu_kernels.available():
            pytest.skip("the CPU attention kernels do not build here")
    else:
        monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    return request.param


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("page_size", [1, 4])
def test_decode_mixed_lengths_matches_dense(group, page_size, device, decode_path):
    torch.manual_seed(group * 100 + page_size)
    heads = KV_HEADS * group
    kv = PagedKV(num_layers=1, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, num_pages=128,
                 page_size=page_size, seed=page_size + 1, device=device)
    backend = make_backend(kv, heads)
    layer = Attention(layer_id=0, num_heads=heads, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    lengths = [1, 17, 6, 33]           # cached tokens before the decode step
    seqs, ks, vs = [], [], []
    for n in lengths:
        seq = Seq(kv.new_row(), list(range(n + 1)), kv_len=n)
        k_all, v_all = torch.randn(n + 1, KV_HEADS, HEAD_DIM), torch.randn(n + 1, KV_HEADS, HEAD_DIM)
        fill_prefix(kv, seq, k_all, v_all, layer.layer_id)
        seqs.append(seq)
        ks.append(k_all)
        vs.append(v_all)

    fb = Harness(model=None, backend=backend, kv=kv).decode_batch(seqs)
    backend.init_forward_metadata(fb)
    q = torch.randn(len(lengths), heads, HEAD_DIM)
    k_new, v_new = torch.stack([k[-1] for k in ks]), torch.stack([v[-1] for v in vs])
    out = layer(*(x.flatten(1).to(device) for x in (q, k_new, v_new)), fb)

    expected = torch.cat([dense_attention(q[i:i + 1], ks[i], vs[i], n) for i, n in enumerate(lengths)])
    torch.testing.assert_close(out.cpu().double(), expected, rtol=1e-5, atol=1e-5)


def test_decode_padded_row_on_the_dummy_slot_stays_finite(decode_path):
    """A graph-padding row points at row 0 / slot 0 with seq_len 0; it must not produce NaN."""
    torch.manual_seed(0)
    kv = PagedKV(num_layers=1, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, num_pages=16)
    backend = make_backend(kv, KV_HEADS)
    layer = Attention(layer_id=0, num_heads=KV_HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    seq = Seq(kv.new_row(), [1, 2, 3], kv_len=2)
    k_all, v_all = torch.randn(3, KV_HEADS, HEAD_DIM), torch.randn(3, KV_HEADS, HEAD_DIM)
    fill_prefix(kv, seq, k_all, v_all, 0)
    fb = Harness(model=None, backend=backend, kv=kv).decode_batch([seq])
    # append one padded row: dummy request row 0, writes to dummy slot 0, length 0
    fb.batch_size, fb.real_batch_size = 2, 1
    fb.req_pool_indices = torch.tensor([seq.row, 0])
    fb.out_cache_loc = torch.cat([fb.out_cache_loc, torch.tensor([0])])
    fb.seq_lens, fb.seq_lens_cpu = torch.tensor([3, 0]), [3, 0]
    backend.init_forward_metadata(fb)
    q = torch.randn(2, KV_HEADS, HEAD_DIM)
    k_new = torch.stack([k_all[-1], torch.zeros(KV_HEADS, HEAD_DIM)])
    out = layer(q.flatten(1), k_new.flatten(1), torch.stack([v_all[-1], k_new[1]]).flatten(1), fb)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:1].double(), dense_attention(q[:1], k_all, v_all, 2), rtol=1e-5, atol=1e-5)


def test_plugin_registers_torch_native():
    pm = PluginManager(autoload=False)
    pm.add_plugin(torch_native_plugin)
    assert "torch_native" in pm.registry("attention_backends")
    assert pm.registry("attention_backends").get("torch_native").name == "torch_native"
