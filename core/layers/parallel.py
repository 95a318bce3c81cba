"""How a ``Linear`` is split over the tensor-parallel ranks (Megatron's two shapes).

    ColumnParallel   W [out, in] split by output rows: y_local = x @ W_local.T, outputs stay
                     local ([T, out / tp]); a fused layer (qkv, gate_up) splits each of its
                     outputs on its own, so every rank keeps [q_r | k_r | v_r]. ``shards`` gives
                     each output's split when it is not even (KV heads replicated, padded
                     vocabulary); default: each output split evenly.
    RowParallel      W split by input columns: each rank multiplies its slice of x and the
                     partial outputs are summed by an all-reduce ([T, out] on every rank); the
                     bias is added once (rank 0 holds it, the others hold zeros). ``reduce=False``
                     leaves the partial sum to the caller (the MoE experts sum once per layer).

A model builds ``Linear(in, full_output_sizes, parallel=ColumnParallel(ctx.tp))``; the layer
keeps local sizes (``output_sizes``, ``in_features``), so its LinearMethod (quantization) only
ever sees local shapes, and slices every checkpoint entry at load (core/distributed/shard.py).
With one rank both specs are the identity.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from kvyard.distributed import Shard, TensorParallel


@dataclass(frozen=True)
class ColumnParallel:
    tp: TensorParallel
    shards: Optional[tuple[Shard, ...]] = None

    def out_shards(self, output_sizes: Sequence[int], prefix: str) -> list[Shard]:
        if self.shards is None:
            return [self.tp.split(n, f"{prefix} output size") for n in output_sizes]
        if [s.full for s in self.shards] != list(output_sizes):
            raise ValueError(f"{prefix}: shards {self.shards} do not cover output sizes {list(output_sizes)}")
        return list(self.shards)


@dataclass(frozen=True)
class RowParallel:
    tp: TensorParallel
    reduce: bool = True

    def in_shard(self, in_features: int, prefix: str) -> Shard:
        return self.tp.split(in_features, f"{prefix} input size")
