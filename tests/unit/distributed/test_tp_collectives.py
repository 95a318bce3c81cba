"""The parallel layers that talk to each other, on two real gloo ranks (two processes): the
vocabulary-parallel embedding (padded vocabulary), the gathered logits, a row-parallel
all-reduce and the split MoE experts each equal the single-rank layer built from the same
weights."""
import torch
import torch.multiprocessing as mp

from kvyard.distributed import TensorParallel
from kvyard.layers.embedding import VocabEmbedding
from kvyard.layers.linear import Linear
from kvyard.layers.logits import LogitsHead
from kvyard.layers.moe import FusedMoE
from kvyard.layers.parallel import ColumnParallel, RowParallel
from kvyard.model_base import ModelBuildContext

VOCAB, HIDDEN, EXPERTS, INTER = 11, 8, 3, 6   # 11: the last rank's vocabulary shard is padded


def _weights():
    g = torch.Generator().manual_seed(0)
    return {"embed": torch.randn(VOCAB, HIDDEN, generator=g), "down": torch.randn(HIDDEN, 2 * HIDDEN, generator=g),
            "down_bias": torch.randn(HIDDEN, generator=g), "gate": torch.randn(EXPERTS, INTER, HIDDEN, generator=g),
            "up": torch.randn(EXPERTS, INTER, HIDDEN, generator=g), "w2": torch.randn(EXPERTS, HIDDEN, INTER, generator=g)}


def _layers(tp: TensorParallel, w: dict):
    embed = VocabEmbedding(VOCAB, HIDDEN, tp=tp)
    embed.load(w["embed"])
    head = Linear(HIDDEN, VOCAB, parallel=ColumnParallel(tp, (tp.split_padded(VOCAB),)))
    head.load_shard(0, w["embed"])
    down = Linear(2 * HIDDEN, HIDDEN, bias=True, parallel=RowParallel(tp))
    down.load_shard(0, w["down"])
    down.load_bias_shard(0, w["down_bias"])
    moe = FusedMoE(EXPERTS, HIDDEN, INTER, ModelBuildContext(torch.float32, "cpu", tp=tp), "experts")
    for e in range(EXPERTS):
        for part in ("gate", "up"):
            moe.load_expert(e, part, w[part][e])
        moe.load_expert(e, "down", w["w2"][e])
    return embed, LogitsHead(head, vocab_size=VOCAB), down, moe


def _run(rank: int, init: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    tp = TensorParallel(rank=rank, size=2)
    w = _weights()
    ids = torch.tensor([0, 5, 6, 10, 3])
    weights = torch.tensor([[0.7, 0.3]] * 5)
    choice = torch.tensor([[0, 2], [1, 0], [2, 1], [0, 1], [2, 0]])
    whole, part = _layers(TensorParallel(), w), _layers(tp, w)
    h = whole[0](ids)
    torch.testing.assert_close(part[0](ids), h)
    torch.testing.assert_close(part[1](h), whole[1](h))           # [5, 11]: gathered, padding cut
    x = torch.randn(5, 2 * HIDDEN, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(part[2](x[:, rank * HIDDEN:(rank + 1) * HIDDEN]), whole[2](x))
    torch.testing.assert_close(part[3](h, weights, choice), whole[3](h, weights, choice))
    dist.destroy_process_group()


def test_parallel_layers_on_two_gloo_ranks_equal_one_rank(tmp_path):
    mp.spawn(_run, args=(f"file://{tmp_path}/store",), nprocs=2, join=True)
