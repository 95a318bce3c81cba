"""PrefixCache: the interface the scheduler uses to share and release KV across requests.

Two implementations: RadixCache (radix_cache.py, the default) and ChunkCache (chunk_cache.py,
--disable-radix-cache, caches nothing).

Lifecycle of one request (``req`` is kvyard.scheduler.req.Req; see its KV invariants):
  1. ``m = cache.match_prefix(key)``; the scheduler locks ``cache.inc_lock_ref(m.last_node)``,
     allocates a req_to_token row, writes ``m.indices`` into it and sets
     ``req.prefix_indices = m.indices``, ``req.last_node = m.last_node``,
     ``req.kv_len = len(m.indices)``. Pass a key that leaves at least one token to compute
     (e.g. ``all_ids[:-1]``): the cache returns whatever prefix it holds.
  2. after each chunked-prefill step that leaves the request unfinished:
     ``cache.cache_unfinished_req(req)``. The next chunk starts at ``req.kv_len`` (not at
     ``len(req.prefix_indices)``, which may be shorter).
  3. ``cache.cache_finished_req(req)`` when it finishes, or ``cache.release_req(req, insert)``
     on abort / retraction. Afterwards the request owns no slot and no row.

Between steps every usable slot is in exactly one of: the allocator's free set,
``cache.cached_slots()``, or a running request's ``row[len(prefix_indices):kv_len]``
(checked by integrity.check_kv_integrity).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class MatchResult:
    indices: torch.Tensor   # int64 [P] slots of the matched prefix, P a multiple of page_size
    last_node: Any          # the node to lock while the prefix is in use (None for ChunkCache)


class PrefixCache(ABC):
    def __init__(self, allocator, req_to_token, page_size: int = 1):
        if page_size != allocator.page_size:
            raise ValueError(f"page_size {page_size} differs from the allocator's page_size "
                             f"{allocator.page_size}")
        self.allocator = allocator
        self.req_to_token = req_to_token
        self.page_size = page_size

    @abstractmethod
    def match_prefix(self, key: list[int], namespace=None) -> MatchResult:
        """Longest cached prefix of ``key`` (page-aligned) within ``namespace`` (None: the base
        model; LoRA serving keys each adapter apart: ``req.cache_namespace``). Does not lock it."""

    @abstractmethod
    def cache_finished_req(self, req) -> None:
        """Hand the request's KV to the cache (or free it), unlock, free its row."""

    @abstractmethod
    def cache_unfinished_req(self, req) -> None:
        """Make the KV computed so far shareable; the request keeps running."""

    @abstractmethod
    def release_req(self, req, insert: bool) -> None:
        """Abort / retraction: insert=True caches what has KV (like cache_finished_req),
        insert=False frees it. Either way the request owns nothing afterwards."""

    @abstractmethod
    def inc_lock_ref(self, node) -> None: ...

    @abstractmethod
    def dec_lock_ref(self, node) -> None: ...

    @abstractmethod
    def evict(self, num_tokens: int) -> int:
        """Free at least num_tokens slots of unlocked entries if possible; returns slots freed."""

    @abstractmethod
    def evictable_size(self) -> int:
        """Cached tokens no running request locks."""

    @abstractmethod
    def protected_size(self) -> int:
        """Cached tokens locked by at least one running request."""

    @abstractmethod
    def cached_slots(self) -> torch.Tensor:
        """int64 every slot held by the cache (for the integrity check)."""

    @abstractmethod
    def reset(self) -> None:
        """Drop every unlocked entry (flush_cache); meant for when no request is running."""

    @abstractmethod
    def stats(self) -> dict:
        """Counters: cached_tokens, evictable, protected, hit_tokens, query_tokens, ..."""


# ---- helpers both caches use for request bookkeeping ------------------------------------------
def req_kv_slots(req_to_token, req) -> torch.Tensor:
    """int64 [kv_len] slots of the request's tokens that have KV, on the host (where the
    allocator and the prefix cache keep slots)."""
    return req_to_token.table[req.req_pool_idx, : req.kv_len].to("cpu", torch.int64)


def detach_req(req_to_token, req) -> None:
    """Free the request's row and clear its KV fields: it owns nothing afterwards."""
    if req.req_pool_idx is not None:
        req_to_token.free(req.req_pool_idx)
    req.req_pool_idx = None
    req.prefix_indices = torch.empty(0, dtype=torch.int64)
    req.last_node = None
    req.kv_len = 0
