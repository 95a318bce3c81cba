"""ChunkCache (--disable-radix-cache): matches nothing, requests own all their KV, finishing
or releasing frees it."""
import pytest
import torch

from kvyard.mem_cache.allocator import SlotAllocator
from kvyard.mem_cache.chunk_cache import ChunkCache
from kvyard.mem_cache.integrity import check_kv_integrity
from kvyard.mem_cache.req_to_token import ReqToTokenPool
from kvyard.scheduler.req import Req


def _setup(page_size):
    alloc = SlotAllocator(32 * page_size, page_size)
    pool = ReqToTokenPool(4, 64)
    return alloc, pool, ChunkCache(alloc, pool, page_size)


def _running_req(alloc, pool, cache, n_tokens):
    req = Req(rid="r", origin_input_ids=list(range(n_tokens + 1)), sampling_params=None)
    m = cache.match_prefix(req.all_ids[:-1])
    assert m.indices.numel() == 0 and m.last_node is None
    req.req_pool_idx = pool.alloc()
    first = alloc.alloc_for_req(0, -1, n_tokens // 2)
    pool.write(req.req_pool_idx, 0, first)
    req.kv_len = first.numel()
    cache.cache_unfinished_req(req)                    # keeps everything owned by the req
    assert req.prefix_indices.numel() == 0 and req.kv_len == first.numel()
    rest = alloc.alloc_for_req(req.kv_len, int(first[-1]), n_tokens - req.kv_len)
    pool.write(req.req_pool_idx, req.kv_len, rest)
    req.kv_len = n_tokens
    return req


@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize("finish", ["finished", "abort", "retract"])
def test_requests_own_everything_and_free_it(page_size, finish):
    alloc, pool, cache = _setup(page_size)
    req = _running_req(alloc, pool, cache, 11)
    check_kv_integrity(alloc, cache, [req], pool)
    assert alloc.available() == alloc.num_slots - page_size - alloc.pages_needed(0, 11) * page_size
    if finish == "finished":
        cache.cache_finished_req(req)
    else:
        cache.release_req(req, insert=(finish == "retract"))
    assert req.req_pool_idx is None and req.kv_len == 0
    assert alloc.available() == alloc.num_slots - page_size and pool.available() == 4
    check_kv_integrity(alloc, cache, [req], pool)


def test_nothing_is_cached_or_evictable():
    alloc, pool, cache = _setup(1)
    req = _running_req(alloc, pool, cache, 6)
    cache.inc_lock_ref(req.last_node)
    assert cache.evict(100) == 0
    assert cache.cached_slots().numel() == 0
    assert (cache.evictable_size(), cache.protected_size()) == (0, 0)
    cache.cache_finished_req(req)
    cache.reset()
    assert cache.stats()["cached_tokens"] == 0
    assert torch.equal(alloc.free_slots(), torch.arange(1, alloc.num_slots))
