"""Tensor parallelism on torch.distributed: who this rank is, and its process groups.

One scheduler process per rank (SGLang's shape). ``world = tp_size`` ranks, spread over
``nnodes`` machines (``tp_size / nnodes`` ranks each; rank = node_rank * ranks_per_node +
local_rank). Rank 0 lives on node 0 beside the API process, receives every request and
broadcasts it (core/distributed/lockstep.py); every rank runs the same schedule; only rank 0
sends results.

``TensorParallel`` is what a model sees (through ``ModelBuildContext.tp``): its rank, the group
size, and how sizes split. With ``size == 1`` every collective is the identity and every split
is the whole, so a single-device model runs the same code. Invariants of a split:
  - a split dim (heads, intermediate rows, vocab rows) divides evenly by ``size`` — except the
    vocabulary, which is padded up to a multiple of ``size`` (padded rows are zero and cut off
    after the logits are gathered) — else a one-line error names the config field;
  - KV heads: when there are fewer KV heads than ranks, each KV head is replicated on
    ``size / num_kv_heads`` ranks (which must divide), so every rank holds exactly one.

Process groups: ``group`` carries tensors (nccl on CUDA, gloo on the CPU); ``cpu_group`` (gloo)
carries pickled scheduler messages. On the CPU they are one group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class Shard:
    """This rank's rows [start, start + size) of a dim of ``full`` entries. ``start + size`` may
    pass ``full`` (padded vocabulary): the rows past it are zero."""
    start: int
    size: int
    full: int

    def __mul__(self, k: int) -> "Shard":
        """The same split in units k times finer (heads -> head_dim columns)."""
        return Shard(self.start * k, self.size * k, self.full * k)

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.size == self.full


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    group: Any = None        # torch.distributed ProcessGroup for tensors (None: the default one)
    cpu_group: Any = None    # gloo group for pickled objects (None: the default one)

    @property
    def enabled(self) -> bool:
        return self.size > 1

    def split(self, n: int, field: str) -> Shard:
        """An even split of ``n`` entries; ``field`` names the config value in the error."""
        if n % self.size:
            raise ValueError(f"tp_size {self.size} does not divide {field} ({n})")
        part = n // self.size
        return Shard(self.rank * part, part, n)

    def split_padded(self, n: int) -> Shard:
        """Rows of a dim padded up to a multiple of size (the vocabulary)."""
        part = -(-n // self.size)
        return Shard(self.rank * part, part, n)

    def split_kv_heads(self, num_kv_heads: int) -> Shard:
        """KV heads of this rank: an even split, or one replicated head when there are fewer
        KV heads than ranks."""
        if num_kv_heads >= self.size:
            return self.split(num_kv_heads, "num_key_value_heads")
        if self.size % num_kv_heads:
            raise ValueError(f"num_key_value_heads ({num_kv_heads}) must divide tp_size {self.size} "
                             "when there are fewer KV heads than ranks")
        return Shard(self.rank * num_kv_heads // self.size, 1, num_kv_heads)


SINGLE = TensorParallel()


@dataclass(frozen=True)
class ParallelConfig:
    """The launch flags of tensor parallelism and multi-node (ServerArgs builds it)."""
    tp_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: Optional[str] = None   # HOST:PORT of rank 0's rendezvous (default: a free local port)
    dist_timeout: float = 600.0            # seconds: rendezvous, and any one collective
    device: str = "cpu"

    @property
    def ranks_per_node(self) -> int:
        return self.tp_size // self.nnodes

    def global_rank(self, local_rank: int) -> int:
        return self.node_rank * self.ranks_per_node + local_rank

    @property
    def backend(self) -> str:
        return "nccl" if self.device == "cuda" else "gloo"
