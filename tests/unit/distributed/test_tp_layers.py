"""Tensor-parallel building blocks on the CPU: how sizes split, how checkpoint entries are
sliced (tensors, lazy safetensors slices, GGUF blocks), and that each rank's column- or
row-parallel Linear computes exactly its share of the single-rank layer. The layers that need
collectives (vocabulary-parallel embedding and logits, experts, row-parallel reduce) run on two
real gloo ranks in test_tp_collectives.py."""
import time

import gguf
import numpy as np
import pytest
import torch

from kvyard.distributed import ParallelConfig, PipelineStage, Shard, TensorParallel
from kvyard.distributed.init import DistributedInitError, free_local_addr, init_parallel, parse_addr
from kvyard.distributed.shard import take
from kvyard.layers.linear import Linear
from kvyard.layers.parallel import ColumnParallel, RowParallel
from kvyard.loader import LazyTensor, QuantizedTensor


def ranks(size: int) -> list[TensorParallel]:
    return [TensorParallel(rank=r, size=size) for r in range(size)]


def test_splits_and_their_errors():
    tp = TensorParallel(rank=1, size=2)
    assert tp.split(8, "num_attention_heads") == Shard(4, 4, 8)
    with pytest.raises(ValueError, match=r"tp_size 2 does not divide num_attention_heads \(9\)"):
        tp.split(9, "num_attention_heads")
    assert tp.split_padded(251) == Shard(126, 126, 251)           # vocabulary padded to 252
    # fewer KV heads than ranks: each rank holds one, replicated
    assert [t.split_kv_heads(1) for t in ranks(4)] == [Shard(0, 1, 1)] * 4
    assert [t.split_kv_heads(2).start for t in ranks(4)] == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="num_key_value_heads"):
        TensorParallel(rank=0, size=4).split_kv_heads(3)


def test_take_pads_the_last_vocabulary_shard_and_reads_lazy_slices(tmp_path):
    full = torch.arange(15.0).reshape(5, 3)
    last = take(full, 0, TensorParallel(rank=1, size=2).split_padded(5), "w")
    torch.testing.assert_close(last, torch.cat([full[3:], torch.zeros(1, 3)]))
    from safetensors import safe_open
    from safetensors.torch import save_file

    save_file({"w": full}, str(tmp_path / "w.safetensors"))
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        lazy = LazyTensor(f.get_slice("w"), (5, 3), lambda t: t.double())
        cols = take(lazy, 1, Shard(1, 2, 3), "w")
        assert cols.dtype == torch.float64
        torch.testing.assert_close(cols, full[:, 1:].double())
    with pytest.raises(ValueError, match="w: checkpoint dim 0 has 5 entries, the model splits 6"):
        take(full, 0, Shard(0, 3, 6), "w")


def _q8_0(rows: int, cols: int) -> tuple[QuantizedTensor, torch.Tensor]:
    values = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
    data = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0)
    q = QuantizedTensor(torch.from_numpy(data), (rows, cols), int(gguf.GGMLQuantizationType.Q8_0))
    return q, q.dequantize()


def test_take_keeps_gguf_blocks_where_the_split_follows_them():
    q, dense = _q8_0(4, 128)                    # Q8_0 blocks are 32 columns wide
    rows = take(q, 0, Shard(2, 2, 4), "w")
    assert isinstance(rows, QuantizedTensor)
    torch.testing.assert_close(rows.dequantize(), dense[2:])
    cols = take(q, 1, Shard(64, 64, 128), "w")
    assert isinstance(cols, QuantizedTensor) and cols.shape == (4, 64)
    torch.testing.assert_close(cols.dequantize(), dense[:, 64:])
    odd = take(q, 1, Shard(48, 16, 128), "w")   # not on a block boundary: dequantized, then sliced
    assert isinstance(odd, torch.Tensor)
    torch.testing.assert_close(odd, dense[:, 48:64])


def test_column_parallel_qkv_with_replicated_kv_heads_is_a_slice_of_the_whole():
    torch.manual_seed(0)
    hidden, d, heads, kv_heads = 16, 4, 4, 1
    sizes = [heads * d, kv_heads * d, kv_heads * d]
    weights = [torch.randn(n, hidden) for n in sizes]
    biases = [torch.randn(n) for n in sizes]
    whole = Linear(hidden, sizes, bias=True)
    for i, (w, b) in enumerate(zip(weights, biases)):
        whole.load_shard(i, w)
        whole.load_bias_shard(i, b)
    x = torch.randn(3, hidden)
    q, k, v = whole.split(whole(x))
    for tp in ranks(2):
        qs, kvs = tp.split(heads, "heads"), tp.split_kv_heads(kv_heads)
        part = Linear(hidden, sizes, bias=True, parallel=ColumnParallel(tp, (qs * d, kvs * d, kvs * d)))
        assert part.output_sizes == [8, 4, 4] and part.full_output_sizes == sizes
        for i, (w, b) in enumerate(zip(weights, biases)):
            part.load_shard(i, w)
            part.load_bias_shard(i, b)
        pq, pk, pv = part.split(part(x))
        torch.testing.assert_close(pq, q[:, tp.rank * 8:(tp.rank + 1) * 8])
        torch.testing.assert_close(pk, k)     # the one KV head, on both ranks
        torch.testing.assert_close(pv, v)


def test_row_parallel_partial_outputs_sum_to_the_whole_with_the_bias_once():
    torch.manual_seed(0)
    w, b, x = torch.randn(5, 8), torch.randn(5), torch.randn(3, 8)
    whole = Linear(8, 5, bias=True)
    whole.load_shard(0, w)
    whole.load_bias_shard(0, b)
    total = torch.zeros(3, 5)
    for tp in ranks(2):
        part = Linear(8, 5, bias=True, parallel=RowParallel(tp))
        assert part.in_features == 4
        part.load_shard(0, w)
        part.load_bias_shard(0, b)
        total += part.method.apply(part, x[:, tp.rank * 4:(tp.rank + 1) * 4])   # before the all-reduce
    torch.testing.assert_close(total, whole(x))


def test_a_split_that_cannot_follow_the_checkpoint_layout_is_refused_by_name():
    part = Linear(8, 4, parallel=ColumnParallel(TensorParallel(rank=0, size=2)), prefix="model.x")
    with pytest.raises(ValueError, match=r"model\.x\.qweight: tensor parallelism cannot split .*not supported yet"):
        part._local(0, torch.zeros(8, 3, dtype=torch.int32), "qweight")   # packed [in, out / 8]


def test_unreachable_dist_init_addr_fails_within_the_timeout():
    addr = free_local_addr()   # nobody listens there: node 1 waits for a node 0 that never comes
    config = ParallelConfig(tp_size=2, nnodes=2, node_rank=1, dist_init_addr=addr, dist_timeout=3)
    started = time.monotonic()
    with pytest.raises(DistributedInitError, match=rf"dist_init_addr: rank 1 of 2 could not join the group at "
                                                   rf"{addr} within --dist-timeout 3 s"):
        init_parallel(config, local_rank=0)
    assert time.monotonic() - started < 30


def test_parse_addr():
    assert parse_addr("10.0.0.1:29500") == ("10.0.0.1", 29500)
    assert parse_addr("[::1]:29500") == ("::1", 29500)
    for bad in ("host", "host:", ":1", "host:70000"):
        with pytest.raises(ValueError, match="dist_init_addr must be HOST:PORT"):
            parse_addr(bad)


def test_pipeline_stages_split_the_layers_contiguously():
    stages = [PipelineStage(rank=r, size=3) for r in range(3)]
    assert [s.layers(8) for s in stages] == [range(0, 3), range(3, 6), range(6, 8)]
    assert [(s.is_first, s.is_last) for s in stages] == [(True, False), (False, False), (False, True)]
    with pytest.raises(ValueError, match=r"pp_size 3 exceeds num_hidden_layers \(2\)"):
        stages[0].layers(2)
