"""FutureTokenMap: token ids a batch will sample, usable as inputs before they exist.

With overlap scheduling (core/scheduler/inflight.py) the scheduler builds decode batch N+1 while
batch N still computes, so the last token of a request that N samples is not known on the host.
Batch N gets ``allocate(S)`` — a contiguous range of S buffer indices, one per sample row — and
N+1 feeds the placeholder ``-(start + k)`` for the request of N's sample row k. The worker that
runs the batches in launch order ``store``s N's sampled ids into the range right after sampling
and ``resolve_``s N+1's input ids right before its forward, both on the device: no host sync.

Invariants:
  - placeholders are negative and token ids are not, so one ``where`` tells them apart;
    index 0 is never handed out (``-0`` would be a real token id).
  - a range is read only by the batch launched right after the one that owns it, and the range
    handed out next never overlaps it (capacity = 3 batches, ranges contiguous), so a
    placeholder keeps its token until that batch has resolved it.
  - buffer writes (store) and reads (resolve_) happen on the worker, in launch order.
"""
from __future__ import annotations

import torch

BATCHES_KEPT = 3   # capacity in batches: two consecutive ranges never overlap


class FutureTokenMap:
    def __init__(self, max_batch: int, device="cpu"):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch
        self.capacity = BATCHES_KEPT * max_batch
        self.buffer = torch.zeros(self.capacity + 1, dtype=torch.int64, device=device)  # [1 + capacity]
        self._next = 1

    def allocate(self, n: int) -> int:
        """First buffer index of a fresh contiguous range of n (0 < n <= max_batch; 0 when n == 0).
        The range's placeholders are ``placeholder(start, k)`` for k in range(n)."""
        if n == 0:
            return 0
        if not 0 < n <= self.max_batch:
            raise ValueError(f"a batch samples 1..{self.max_batch} tokens, got {n}")
        if self._next + n - 1 > self.capacity:
            self._next = 1      # wrap: ranges stay contiguous, so store is one slice copy
        start = self._next
        self._next += n
        return start

    @staticmethod
    def placeholder(start: int, k: int) -> int:
        """The input id standing for sample row k of the range that starts at ``start``."""
        return -(start + k)

    def store(self, start: int, next_ids: torch.Tensor) -> None:
        """next_ids [n] int64 on the device: the sampled tokens of the range at ``start``."""
        n = next_ids.numel()
        if n:
            self.buffer[start:start + n] = next_ids

    def resolve_(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Replaces placeholders in input_ids (int64 on the device) in place; returns it."""
        index = input_ids.neg().clamp_(min=0)          # real ids -> 0, whose value is not used
        input_ids.copy_(torch.where(input_ids < 0, self.buffer[index], input_ids))
        return input_ids
