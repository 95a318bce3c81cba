"""ChunkCache: the prefix cache for --disable-radix-cache. It caches nothing and only frees.

Choice of bookkeeping: a request keeps owning every slot it computed, across chunks, until it
finishes. ``req.prefix_indices`` stays empty and ``last_node`` stays None, so the Req invariant
"slots [:len(prefix_indices)] belong to the cache" holds trivially, and the integrity check
counts ``row[0:kv_len]`` as owned by the request. The next chunk starts at ``req.kv_len``.
"""
from __future__ import annotations

import torch

from kvyard.mem_cache.prefix_cache import MatchResult, PrefixCache, detach_req, req_kv_slots


class ChunkCache(PrefixCache):
    def __init__(self, allocator, req_to_token, page_size: int = 1):
        super().__init__(allocator, req_to_token, page_size)
        self._empty = torch.empty(0, dtype=torch.int64, device=allocator.device)
        self._query_tokens = 0

    def match_prefix(self, key: list[int], namespace=None) -> MatchResult:
        self._query_tokens += len(key)
        return MatchResult(indices=self._empty, last_node=None)

    def cache_finished_req(self, req) -> None:
        self.release_req(req, insert=False)

    def cache_unfinished_req(self, req) -> None:
        assert req.prefix_indices.numel() == 0, (
            f"req {req.rid}: ChunkCache requests never hold a cached prefix")

    def release_req(self, req, insert: bool) -> None:
        if req.req_pool_idx is not None:
            self.allocator.free(req_kv_slots(self.req_to_token, req))
        detach_req(self.req_to_token, req)

    def inc_lock_ref(self, node) -> None:
        return None   # nothing is cached, so there is nothing to protect

    def dec_lock_ref(self, node) -> None:
        return None

    def evict(self, num_tokens: int) -> int:
        return 0

    def evictable_size(self) -> int:
        return 0

    def protected_size(self) -> int:
        return 0

    def cached_slots(self) -> torch.Tensor:
        return self._empty

    def reset(self) -> None:
        self._query_tokens = 0

    def stats(self) -> dict:
        return {"cached_tokens": 0, "evictable": 0, "protected": 0,
                "hit_tokens": 0, "query_tokens": self._query_tokens, "evicted_tokens": 0}
