"""The collectives the parallel layers and the lockstep loop use. Each is the identity for a
single rank, so model code calls them unconditionally.

    all_reduce(x)            sum over ranks, in place; every rank gets the same values
    all_gather_last(x)       [..., n] per rank -> [..., size * n] in rank order
    broadcast_object(obj)    rank 0's picklable object on every rank (cpu group)
    gather_objects(obj)      every rank's object, on every rank (cpu group), in rank order
"""
from __future__ import annotations

from typing import Any

import torch

from kvyard.distributed import TensorParallel


def all_reduce(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    if not tp.enabled:
        return x
    import torch.distributed as dist

    dist.all_reduce(x, group=tp.group)
    return x


def all_gather_last(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """x [..., n] (the same shape on every rank) -> [..., size * n]."""
    if not tp.enabled:
        return x
    import torch.distributed as dist

    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(tp.size)]
    dist.all_gather(parts, x, group=tp.group)
    return torch.cat(parts, dim=-1)


def broadcast_object(obj: Any, tp: TensorParallel) -> Any:
    if not tp.enabled:
        return obj
    import torch.distributed as dist

    box = [obj if tp.rank == 0 else None]
    dist.broadcast_object_list(box, src=0, group=tp.cpu_group)
    return box[0]


def gather_objects(obj: Any, tp: TensorParallel) -> list:
    if not tp.enabled:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * tp.size
    dist.all_gather_object(out, obj, group=tp.cpu_group)
    return out

