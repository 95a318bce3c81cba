"""The data-parallel controller: ``--dp-size N`` scheduler replicas behind one TokenizerManager.

It stands in for the manager's one (PUSH, PULL) socket pair: ``send_pyobj`` dispatches and
``recv_pyobj`` receives, so the manager does not know how many replicas there are.

- A new request (TokenizedGenerateReq) goes to one replica chosen by ``--load-balance-method``:
  round_robin, shortest_queue (fewest unfinished requests owned), or cache_aware (the router's
  approximate radix tree over the prompt's token ids, one character per token id).
- An abort goes to the replica that owns the request (abort-all: every replica).
- A control request and "shutdown" go to every replica; the manager takes the first reply of a
  control id and drops the others (replicas run the same code on the same weights).
- Every replica's outputs arrive on one PULL socket bound to all N addresses; a finished update
  releases its request's ownership.

Invariant: ``owner[rid]`` exists exactly while a request sent to a replica has not finished or
been aborted; ``replicas[i].load`` counts the rids it owns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import zmq

from kvyard.router.config import CacheAwareConfig
from kvyard.router.policies import make_policy
from kvyard.scheduler.io_struct import AbortReq, BatchTokenOut, TokenizedGenerateReq

LOAD_BALANCE_METHODS = ("round_robin", "shortest_queue", "cache_aware")
EVICT_EVERY = 1024  # requests between two evictions of the cache-aware tree


@dataclass(eq=False)
class _Replica:
    url: str      # the policies' worker key: "dp0", "dp1", ...
    socket: Any
    load: int = 0


class DataParallelController:
    def __init__(self, ctx, send_addrs: Sequence[str], recv_addrs: Sequence[str], method: str) -> None:
        if method not in LOAD_BALANCE_METHODS:
            raise ValueError(f"load_balance_method must be one of {', '.join(LOAD_BALANCE_METHODS)}, got {method!r}")
        # exact token prefixes: any match is worth following unless the load is off by more than 2
        self.policy = make_policy(method, CacheAwareConfig(cache_threshold=0.0, balance_abs_threshold=2))
        self.replicas = []
        for i, addr in enumerate(send_addrs):
            sock = ctx.socket(zmq.PUSH)
            sock.bind(addr)
            self.replicas.append(_Replica(f"dp{i}", sock))
        self._recv = ctx.socket(zmq.PULL)
        for addr in recv_addrs:
            self._recv.bind(addr)
        self.owner: dict[str, _Replica] = {}
        self._sent = 0

    # -- the PUSH side ----------------------------------------------------------------------
    def send_pyobj(self, obj: Any, flags: int = 0) -> None:
        if isinstance(obj, TokenizedGenerateReq):
            replica, _ = self.policy.select(self.replicas, "".join(map(chr, obj.input_ids)))
            self._sent += 1
            if self._sent % EVICT_EVERY == 0 and hasattr(self.policy, "evict"):
                self.policy.evict()  # keeps the cache-aware tree within max_tree_size tokens per replica
            self.owner[obj.rid] = replica
            replica.load += 1
            replica.socket.send_pyobj(obj, flags)
        elif isinstance(obj, AbortReq) and obj.rid:
            replica = self._release(obj.rid)
            if replica is not None:
                replica.socket.send_pyobj(obj, flags)
        else:  # abort-all, control requests, shutdown
            for replica in self.replicas:
                replica.socket.send_pyobj(obj, flags)

    def _release(self, rid: str):
        replica = self.owner.pop(rid, None)
        if replica is not None:
            replica.load -= 1
        return replica

    # -- the PULL side ----------------------------------------------------------------------
    async def recv_pyobj(self) -> Any:
        msg = await self._recv.recv_pyobj()
        if isinstance(msg, BatchTokenOut):
            for update in msg.updates:
                if update.finished_reason is not None:
                    self._release(update.rid)
        return msg

    def close(self, linger: int = 0) -> None:
        for replica in self.replicas:
            replica.socket.close(linger=linger)
        self._recv.close(linger=0)
