"""Tree-masked extend (speculative tree verify) of torch_native, triton (CPU interpreter) and
flex_attention
against dense attention with the same mask, per request; and the draft-tree bookkeeping
(kvyard.speculative.DraftTree): masks, the acceptance walk, pruning."""
import os

os.environ["TRITON_INTERPRET"] = "1"   # before triton is imported anywhere in this process

import random

import pytest
import torch

from forward_harness import Harness, PagedKV, Seq
from kvyard.forward_batch import TreeMask
from kvyard.layers.attention import Attention
from kvyard.plugins import PluginManager
from kvyard.speculative import DraftTree

KV_HEADS = 2


def random_tree(rng: random.Random, n: int) -> DraftTree:
    tokens, parents = [], []
    for i in range(n):
        p = rng.randrange(-1, i)
        tokens.append(100 + i)        # distinct tokens: siblings never collide
        parents.append(p)
    return DraftTree(tuple(tokens), tuple(parents))


def dense_masked(q, k, v, prefix: int, tree_mask: torch.Tensor) -> torch.Tensor:
    """q [n, H, D], k/v [prefix + n, Hkv, D]; new row r sees the prefix and new keys c with
    tree_mask[r, c] -> [n, H * D] in float64."""
    q, k, v = q.double(), k.double(), v.double()
    n, heads, dim = q.shape
    group = heads // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * dim ** -0.5
    allowed = torch.cat([torch.ones(n, prefix, dtype=torch.bool), tree_mask], dim=1)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v).reshape(n, -1)


def make_backend(name: str, kv: PagedKV, heads: int, head_dim: int):
    import importlib
    plugin = importlib.import_module(f"kvyard_plugins.attention.{name}")
    pm = PluginManager(autoload=False)
    pm.add_plugin(plugin)
    cfg = kv.backend_config(heads, head_dim)
    cfg = type(cfg)(**{**cfg.__dict__, "features": frozenset({"spec_tree"})})
    return pm.registry("attention_backends").get(name)(cfg)


@pytest.mark.parametrize("backend_name", ["torch_native", "triton", "flex_attention"])
@pytest.mark.parametrize("page_size", [1, 4])
def test_tree_masked_extend_matches_dense(backend_name, page_size):
    if backend_name == "triton":
        pytest.importorskip("triton")
    rng = random.Random(page_size)
    torch.manual_seed(page_size)
    head_dim, group = 16, 2
    heads = KV_HEADS * group
    kv = PagedKV(num_layers=1, num_kv_heads=KV_HEADS, head_dim=head_dim, num_pages=256 // page_size,
                 page_size=page_size, seed=page_size)
    backend = make_backend(backend_name, kv, heads, head_dim)
    layer = Attention(layer_id=0, num_heads=heads, num_kv_heads=KV_HEADS, head_dim=head_dim)
    # (cached prefix, tree) per request: a branching tree, a chain, a lone root, a wide tree
    trees = [random_tree(rng, 7), DraftTree.chain([5, 6, 7]), DraftTree((), ()), random_tree(rng, 12)]
    prefixes = [9, 3, 17, 1]
    seqs, tensors, masks = [], [], []
    for prefix, tree in zip(prefixes, trees):
        n = len(tree) + 1
        seq = Seq(kv.new_row(), list(range(prefix + n)), kv_len=prefix)
        k_all, v_all = torch.randn(prefix + n, KV_HEADS, head_dim), torch.randn(prefix + n, KV_HEADS, head_dim)
        if prefix:
            kv.pool.set_kv(0, kv.allocate(seq.row, 0, prefix), k_all[:prefix], v_all[:prefix])
        seqs.append(seq)
        tensors.append((torch.randn(n, heads, head_dim), k_all, v_all))
        masks.append(torch.tensor(tree.mask()))
    fb = Harness(model=None, backend=backend, kv=kv).extend_batch(seqs, [len(t) + 1 for t in trees])
    fb.spec_tree = TreeMask.from_rows([t.mask() for t in trees], "cpu")
    backend.init_forward_metadata(fb)
    q = torch.cat([t[0] for t in tensors])
    k_new = torch.cat([k[p:] for p, (_, k, _) in zip(prefixes, tensors)])
    v_new = torch.cat([v[p:] for p, (_, _, v) in zip(prefixes, tensors)])
    out = layer(q.flatten(1), k_new.flatten(1), v_new.flatten(1), fb)
    expected = torch.cat([dense_masked(q_i, k_i, v_i, p, m)
                          for p, m, (q_i, k_i, v_i) in zip(prefixes, masks, tensors)])
    err = (out.double() - expected).abs().max().item()
    assert err < 2e-5, f"max abs error {err:.3g}"
    # the mask matters: plain causal attention differs on the branching trees
    causal = torch.cat([dense_masked(q_i, k_i, v_i, p, torch.ones_like(m).tril())
                        for p, m, (q_i, k_i, v_i) in zip(prefixes, masks, tensors)])
    assert (causal - expected).abs().max().item() > 1e-3


def test_backends_without_the_tree_mask_are_refused_by_name():
    kv = PagedKV(num_layers=1, num_kv_heads=KV_HEADS, head_dim=16, num_pages=8, page_size=1)
    from kvyard.attention import AttentionBackend

    class Plain(AttentionBackend):
        name = "plain"

        def forward_extend(self, q, layer, fb):
            raise AssertionError

        def forward_decode(self, q, layer, fb):
            raise AssertionError

    cfg = kv.backend_config(4, 16)
    with pytest.raises(ValueError, match="'plain': tree-masked verify of speculative draft trees is not supported yet"):
        Plain(type(cfg)(**{**cfg.__dict__, "features": frozenset({"spec_tree"})}))
    from kvyard_plugins.attention.flashinfer_backend import FlashInferBackend
    with pytest.raises(ValueError, match="'flashinfer': tree-masked verify .* is not supported yet"):
        FlashInferBackend(type(cfg)(**{**cfg.__dict__, "features": frozenset({"spec_tree"})}))
    with pytest.raises(ValueError, match="sliding-window layers are not supported yet"):
        make_backend("torch_native", kv, 4, 16).__class__(
            type(cfg)(**{**cfg.__dict__, "features": frozenset({"spec_tree", "sliding_window"})}))


# -- DraftTree ---------------------------------------------------------------------------------
def test_mask_sees_ancestors_only():
    #        root
    #       /    \
    #     a(0)   b(1)
    #     |       |
    #    c(2)    d(3)
    tree = DraftTree((10, 11, 12, 13), (-1, -1, 0, 1))
    m = tree.mask()
    assert m[0] == [True, False, False, False, False]
    assert m[3] == [True, True, False, True, False]      # c: root, a, itself
    assert m[4] == [True, False, True, False, True]      # d: root, b, itself
    assert tree.depths() == [1, 1, 2, 2]


def test_accept_walks_the_targets_tokens():
    tree = DraftTree((10, 11, 12, 13), (-1, -1, 0, 1))
    # rows: 0 root, 1 a=10, 2 b=11, 3 c=12, 4 d=13; the target says 11 at the root, 13 after b
    assert tree.accept([11, 0, 13, 0, 7]) == [0, 2, 4]
    assert tree.accept([10, 5, 0, 0, 0]) == [0, 1]        # a accepted, its child c=12 is not 5
    assert tree.accept([99, 0, 0, 0, 0]) == [0]
    assert DraftTree.chain([4, 5, 6]).accept([4, 5, 9, 1]) == [0, 1, 2]


def test_pruned_keeps_ancestors_and_limits():
    tree = DraftTree((10, 11, 12, 13, 14), (-1, -1, 0, 1, 2))
    small = tree.pruned(max_nodes=3, max_depth=2)
    assert small.tokens == (10, 11, 12) and small.parents == (-1, -1, 0)
    shallow = tree.pruned(max_nodes=10, max_depth=1)
    assert shallow.tokens == (10, 11)


def test_first_branch_follows_first_children():
    tree = DraftTree((10, 11, 12, 13, 14), (-1, -1, 0, 0, 2))
    assert tree.first_branch().tokens == (10, 12, 14)


def test_bad_trees_are_refused():
    with pytest.raises(ValueError, match="does not precede"):
        DraftTree((1, 2), (1, -1))
    with pytest.raises(ValueError, match="two children with token 5"):
        DraftTree((5, 5), (-1, -1))
