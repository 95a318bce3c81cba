"""Tensor and pipeline parallelism on torch.distributed: who this rank is, and its groups.

One scheduler process per rank (SGLang's shape). ``world = tp_size * pp_size`` ranks, spread
over ``nnodes`` machines (``world / nnodes`` ranks each; rank = node_rank * ranks_per_node +
local_rank). Pipeline parallelism (``PipelineStage``) runs with tp_size 1 today: rank r is
stage r and holds layers ``stage.layers(num_layers)``. Rank 0 lives on node 0 beside the API process, receives every request and
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

Process groups: ``group`` carries the model's tensors (nccl on CUDA, gloo on the CPU); ``cpu_group``
(gloo, always a group of its own) carries the pickled scheduler messages, so the main thread's
broadcasts never interleave with collectives the overlap worker thread issues.
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
class PipelineStage:
    """This rank's place in the pipeline: stage ``rank`` of ``size``. The first stage embeds,
    the last one normalises and computes the logits; hidden states pass stage to stage."""
    rank: int = 0
    size: int = 1

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    def layers(self, num_layers: int) -> range:
        """The decoder layers of this stage: contiguous, as even as can be (the first stages
        take one more when the split is uneven); every stage gets at least one."""
        if num_layers < self.size:
            raise ValueError(f"pp_size {self.size} exceeds num_hidden_layers ({num_layers})")
        base, extra = divmod(num_layers, self.size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (1 if self.rank < extra else 0))


ONE_STAGE = PipelineStage()


@dataclass(frozen=True)
class ParallelConfig:
    """The launch flags of tensor/pipeline parallelism and multi-node (ServerArgs builds it)."""
    tp_size: int = 1
    pp_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: Optional[str] = None   # HOST:PORT of rank 0's rendezvous (default: a free local port)
    dist_timeout: float = 600.0            # seconds: rendezvous, and any one collective
    device: str = "cpu"

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def ranks_per_node(self) -> int:
        return self.world_size // self.nnodes

    def global_rank(self, local_rank: int) -> int:
        return self.node_rank * self.ranks_per_node + local_rank

    @property
    def backend(self) -> str:
        return "nccl" if self.device == "cuda" else "gloo"
