"""Every tensor-parallel rank runs the same schedule: rank 0 hears the API process, the others
hear rank 0.

The scheduler loop reads its messages through an inbox with two calls per iteration:
``wait(ms)`` (only while idle) and ``drain() -> list`` (once per iteration, on every rank). On
rank 0 ``drain`` takes what ZMQ delivered and broadcasts that list (possibly empty) to the group;
on the other ranks it receives the list. So every rank applies the same messages (requests,
aborts, control operations, shutdown) at the same iteration, and — the scheduler being
deterministic given its messages, its seed and the gathered logits — builds the same batches.
Only rank 0 answers: the other ranks' outbox drops what they would send.

An idle rank 0 still broadcasts every IDLE_POLL_MS, so an idle group never runs into the
collective timeout.
"""
from __future__ import annotations

from typing import Any

import zmq

from kvyard.distributed import TensorParallel
from kvyard.distributed.collectives import broadcast_object


class ZmqInbox:
    """One rank (no tensor parallelism): the PULL socket the API process pushes to."""

    def __init__(self, socket):
        self.socket = socket

    def wait(self, timeout_ms: int) -> None:
        self.socket.poll(timeout_ms)

    def pending(self) -> bool:
        """Whether a message waits (never blocks)."""
        return bool(self.socket.poll(0))

    def drain(self) -> list:
        out = []
        while True:
            try:
                out.append(self.socket.recv_pyobj(zmq.NOBLOCK))
            except zmq.Again:
                return out


class LeaderInbox:
    """Rank 0: ZMQ's messages, broadcast to the group."""

    def __init__(self, inbox: ZmqInbox, tp: TensorParallel):
        self.inbox = inbox
        self.tp = tp

    def wait(self, timeout_ms: int) -> None:
        self.inbox.wait(timeout_ms)

    def drain(self) -> list:
        return broadcast_object(self.inbox.drain(), self.tp)


class FollowerInbox:
    """Ranks > 0: rank 0's messages (``drain`` blocks until rank 0 sends them)."""

    def __init__(self, tp: TensorParallel):
        self.tp = tp

    def wait(self, timeout_ms: int) -> None:
        pass

    def drain(self) -> list:
        return broadcast_object(None, self.tp)


class NullOutbox:
    """Ranks > 0 send nothing back."""

    def send_pyobj(self, obj: Any) -> None:
        pass
