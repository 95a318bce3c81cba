"""Joining the group: one call per rank process, before the model is built.

``init_parallel(config, local_rank)`` rendezvouses at ``--dist-init-addr`` (rank 0 listens
there, the others connect) within ``--dist-timeout`` seconds, and returns this rank's
``RankGroups``: the whole world (the lockstep broadcasts), its TensorParallel and its
PipelineStage. Failing to reach the address, or a peer that never arrives, is one
``DistributedInitError`` naming the flag, the address and the timeout, not a hang.
GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME (the network interface the ranks talk over) are read by
gloo and NCCL themselves; the rank processes inherit the environment.
"""
from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

from kvyard.distributed import ONE_STAGE, SINGLE, ParallelConfig, PipelineStage, TensorParallel

logger = logging.getLogger(__name__)


class DistributedInitError(RuntimeError):
    pass


@dataclass(frozen=True)
class RankGroups:
    world: TensorParallel = SINGLE    # every rank (rank 0 broadcasts the scheduler's messages over it)
    tp: TensorParallel = SINGLE       # this stage's tensor-parallel ranks
    pp: PipelineStage = ONE_STAGE     # this rank's pipeline stage


ONE_RANK = RankGroups()


def parse_addr(addr: str) -> tuple[str, int]:
    """"HOST:PORT" (IPv6 hosts in brackets) -> (host, port); ValueError naming the flag."""
    host, sep, port = addr.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"dist_init_addr must be HOST:PORT, got {addr!r}")
    return host, int(port)


def free_local_addr() -> str:
    """A free loopback port for a one-node group (taken by rank 0's store right after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def init_parallel(config: ParallelConfig, local_rank: int, gpu_id: Optional[int] = None) -> RankGroups:
    import torch
    import torch.distributed as dist

    rank = config.global_rank(local_rank)
    host, port = parse_addr(config.dist_init_addr)
    if config.device == "cuda":
        torch.cuda.set_device(local_rank if gpu_id is None else gpu_id)   # --base-gpu-id + r * --gpu-id-step
    timeout = timedelta(seconds=config.dist_timeout)
    try:
        dist.init_process_group(config.backend, init_method=f"tcp://{host}:{port}", rank=rank,
                                world_size=config.world_size, timeout=timeout)
        # the scheduler messages get a gloo group of their own: with overlap scheduling the model's
        # collectives run on the worker thread while the main thread broadcasts, and two threads
        # must never interleave collectives on one group (the ranks would pair them differently)
        cpu_group = dist.new_group(backend="gloo", timeout=timeout)
        dist.barrier(group=cpu_group)   # every rank has joined (a missing peer fails here, within the timeout)
    except Exception as exc:   # torch raises DistNetworkError, DistStoreError, RuntimeError ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DistributedInitError(
            f"dist_init_addr: rank {rank} of {config.world_size} could not join the group at {host}:{port} "
            f"within --dist-timeout {config.dist_timeout:g} s ({type(exc).__name__}: {first})") from None
    logger.info("rank %d of %d (tp %d, pp %d, node %d, %s, rendezvous %s:%d)", rank, config.world_size,
                config.tp_size, config.pp_size, config.node_rank, config.backend, host, port)
    world = TensorParallel(rank=rank, size=config.world_size, group=None, cpu_group=cpu_group)
    if config.pp_size == 1:
        return RankGroups(world, world, ONE_STAGE)
    return RankGroups(world, SINGLE, PipelineStage(rank, config.pp_size))   # tp_size 1 (checked by ServerArgs)


def destroy_tensor_parallel() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
