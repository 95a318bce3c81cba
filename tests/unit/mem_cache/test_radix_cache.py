"""RadixCache: match/insert/split, page-aligned matching, locks and their accounting, LRU
eviction, reset, and the request lifecycle (finished, unfinished, released)."""
import pytest
import torch

from kvyard.mem_cache.allocator import SlotAllocator
from kvyard.mem_cache.integrity import check_kv_integrity
from kvyard.mem_cache.radix_cache import RadixCache
from kvyard.mem_cache.req_to_token import ReqToTokenPool
from kvyard.scheduler.req import Req


class Env:
    def __init__(self, page_size=1, num_pages=64, max_reqs=8, max_context_len=64):
        self.ps = page_size
        self.alloc = SlotAllocator(num_pages * page_size, page_size)
        self.pool = ReqToTokenPool(max_reqs, max_context_len)
        self.cache = RadixCache(self.alloc, self.pool, page_size)

    def slots(self, n):
        """Fresh slots for a new sequence of n tokens."""
        return self.alloc.alloc_for_req(0, -1, n)

    def start(self, rid, ids):
        """Admit a request the way the scheduler does: match, lock, take a row."""
        req = Req(rid=rid, origin_input_ids=list(ids), sampling_params=None)
        m = self.cache.match_prefix(req.all_ids[:-1])
        self.cache.inc_lock_ref(m.last_node)
        req.req_pool_idx = self.pool.alloc()
        self.pool.write(req.req_pool_idx, 0, m.indices)
        req.prefix_indices, req.last_node, req.kv_len = m.indices, m.last_node, m.indices.numel()
        return req

    def extend(self, req, n):
        last = int(self.pool.table[req.req_pool_idx, req.kv_len - 1]) if req.kv_len else -1
        new = self.alloc.alloc_for_req(req.kv_len, last, n)
        self.pool.write(req.req_pool_idx, req.kv_len, new)
        req.kv_len += n
        return new

    def check(self, *reqs):
        check_kv_integrity(self.alloc, self.cache, list(reqs), self.pool)

    def row(self, req):
        return self.pool.table[req.req_pool_idx, : req.kv_len].long()


def test_insert_then_match_longest_prefix_and_split():
    env = Env()
    s = env.slots(4)
    assert env.cache.insert([1, 2, 3, 4], s) == 0
    m = env.cache.match_prefix([1, 2, 3, 4, 5])
    assert torch.equal(m.indices, s)
    m = env.cache.match_prefix([1, 2, 9])
    assert torch.equal(m.indices, s[:2])
    upper = env.cache.root.children[1]
    assert upper is m.last_node and upper.key == [1, 2]
    assert list(upper.children.values())[0].key == [3, 4]
    assert env.cache.match_prefix([7, 1]).indices.numel() == 0
    assert env.cache.match_prefix([]).last_node is env.cache.root
    env.check()


def test_insert_reports_already_cached_prefix():
    env = Env()
    a = env.slots(4)
    env.cache.insert([1, 2, 3, 4], a)
    b = env.slots(6)
    assert env.cache.insert([1, 2, 3, 9, 9, 9], b) == 3
    env.alloc.free(b[:3])                       # the caller frees its duplicates
    m = env.cache.match_prefix([1, 2, 3, 9, 9, 9])
    assert torch.equal(m.indices, torch.cat([a[:3], b[3:]]))
    dup = env.slots(4)
    assert env.cache.insert([1, 2, 3, 4], dup) == 4  # fully cached: the tree takes nothing
    env.alloc.free(dup)
    assert env.cache.evictable_size() == 7
    env.check()


def test_page_aligned_matching():
    env = Env(page_size=4)
    s = env.slots(8)
    env.cache.insert(list(range(10, 18)), s)
    assert torch.equal(env.cache.match_prefix(list(range(10, 17))).indices, s[:4])   # 7 -> 4
    assert torch.equal(env.cache.match_prefix(list(range(10, 15)) + [0, 0, 0]).indices, s[:4])
    assert env.cache.match_prefix([10, 11, 0, 13, 14, 15, 16, 17]).indices.numel() == 0
    # a second key that shares only the first page splits the node at the page boundary
    t = env.slots(8)
    assert env.cache.insert(list(range(10, 14)) + [1, 2, 3, 4], t) == 4
    env.alloc.free(t[:4])
    root_child = env.cache.root.children[(10, 11, 12, 13)]
    assert root_child.key == [10, 11, 12, 13] and len(root_child.children) == 2
    with pytest.raises(ValueError, match="page_size"):
        env.cache.insert([1, 2, 3], torch.tensor([4, 5, 6]))
    env.check()


def test_lock_accounting_and_locked_nodes_survive_eviction():
    env = Env()
    env.cache.insert([1, 2, 3, 4], env.slots(4))
    second = env.slots(5)
    assert env.cache.insert([1, 2, 5, 6, 7], second) == 2   # splits: [1,2] / [3,4] / [5,6,7]
    env.alloc.free(second[:2])
    m = env.cache.match_prefix([1, 2, 5, 6, 7])
    env.cache.inc_lock_ref(m.last_node)
    env.cache.inc_lock_ref(m.last_node)
    assert (env.cache.evictable_size(), env.cache.protected_size()) == (2, 5)
    assert env.cache.evict(100) == 2                  # only [3, 4] can go
    assert env.cache.match_prefix([1, 2, 3, 4]).indices.numel() == 2
    env.cache.dec_lock_ref(m.last_node)
    assert (env.cache.evictable_size(), env.cache.protected_size()) == (0, 5)
    env.cache.dec_lock_ref(m.last_node)
    assert (env.cache.evictable_size(), env.cache.protected_size()) == (5, 0)
    with pytest.raises(AssertionError, match="unlocked"):
        env.cache.dec_lock_ref(m.last_node)
    assert env.cache.evict(1) == 3                    # leaf [5,6,7] first, LRU
    assert env.cache.evict(1) == 2                    # then its parent, now a leaf
    assert env.alloc.available() == env.alloc.num_slots - 1
    env.check()


def test_split_of_a_locked_node_keeps_counts():
    env = Env()
    env.cache.insert([1, 2, 3, 4], env.slots(4))
    m = env.cache.match_prefix([1, 2, 3, 4])
    env.cache.inc_lock_ref(m.last_node)
    env.cache.match_prefix([1, 2, 9])                 # splits the locked node
    assert (env.cache.evictable_size(), env.cache.protected_size()) == (0, 4)
    env.cache.dec_lock_ref(m.last_node)
    assert (env.cache.evictable_size(), env.cache.protected_size()) == (4, 0)
    env.check()


def test_evict_in_lru_order():
    env = Env()
    for first in (1, 2, 3):
        env.cache.insert([first, 0, 0], env.slots(3))
    env.cache.match_prefix([1, 0, 0])                 # touch 1: now 2 is the oldest
    assert env.cache.evict(3) == 3
    assert env.cache.match_prefix([2, 0, 0]).indices.numel() == 0
    assert env.cache.match_prefix([1, 0, 0]).indices.numel() == 3
    assert env.cache.evict(1) == 3
    assert env.cache.match_prefix([3, 0, 0]).indices.numel() == 0
    assert env.cache.match_prefix([1, 0, 0]).indices.numel() == 3
    env.check()


def test_reset_keeps_locked_and_counters_restart():
    env = Env()
    env.cache.insert([1, 2], env.slots(2))
    env.cache.insert([3, 4], env.slots(2))
    m = env.cache.match_prefix([1, 2])
    env.cache.inc_lock_ref(m.last_node)
    env.cache.reset()
    assert env.cache.stats() == {"cached_tokens": 2, "evictable": 0, "protected": 2,
                                 "hit_tokens": 0, "query_tokens": 0, "evicted_tokens": 0}
    env.cache.dec_lock_ref(m.last_node)
    env.cache.reset()
    assert env.cache.cached_slots().numel() == 0
    assert env.alloc.available() == env.alloc.num_slots - 1


def test_stats_count_hits():
    env = Env()
    env.cache.insert([1, 2, 3], env.slots(3))
    env.cache.match_prefix([1, 2, 5, 6])
    env.cache.match_prefix([9])
    st = env.cache.stats()
    assert (st["hit_tokens"], st["query_tokens"], st["cached_tokens"]) == (2, 5, 3)


@pytest.mark.parametrize("page_size", [1, 4])
def test_finished_req_shares_its_kv_and_frees_the_rest(page_size):
    env = Env(page_size=page_size)
    a = env.start("a", range(100, 110))               # 10 prompt tokens, nothing cached
    env.extend(a, 10)
    a.output_ids = [7]                                # the sampled token has no KV yet
    env.check(a)
    env.cache.cache_finished_req(a)
    aligned = 10 - 10 % page_size
    assert a.req_pool_idx is None and a.kv_len == 0 and a.last_node is None
    assert a.prefix_indices.numel() == 0 and env.pool.available() == 8
    assert env.cache.evictable_size() == aligned
    assert env.alloc.available() == env.alloc.num_slots - page_size - aligned
    env.check()

    b = env.start("b", list(range(100, 110)) + [5, 5])
    assert b.kv_len == aligned and env.cache.protected_size() == aligned
    env.extend(b, 12 - b.kv_len)
    env.check(b)
    env.cache.cache_finished_req(b)
    assert env.cache.protected_size() == 0
    assert env.cache.evictable_size() == 12 - 12 % page_size
    env.check()


@pytest.mark.parametrize("page_size", [1, 4])
def test_duplicate_kv_computed_twice_is_freed_on_finish(page_size):
    env = Env(page_size=page_size)
    a, b = env.start("a", range(30, 42)), env.start("b", range(30, 42))   # both miss
    env.extend(a, 12)
    env.extend(b, 12)
    env.cache.cache_finished_req(a)
    env.cache.cache_finished_req(b)                   # b's 12 slots duplicate a's
    assert env.cache.evictable_size() == 12
    assert env.alloc.available() == env.alloc.num_slots - page_size - 12
    env.check()


@pytest.mark.parametrize("page_size", [1, 4])
def test_unfinished_req_points_its_row_at_tree_slots(page_size):
    env = Env(page_size=page_size)
    prompt = list(range(50, 70))
    a, b = env.start("a", prompt), env.start("b", prompt)
    env.extend(a, 7)
    env.cache.cache_unfinished_req(a)                 # first chunk of a
    aligned_a = 7 - 7 % page_size
    assert a.prefix_indices.numel() == aligned_a and a.kv_len == 7
    assert env.cache.protected_size() == aligned_a
    env.check(a, b)
    env.extend(b, 10)
    env.cache.cache_unfinished_req(b)                 # b computed a's chunk again
    aligned_b = 10 - 10 % page_size
    assert torch.equal(env.row(b)[:aligned_a], env.row(a)[:aligned_a])
    assert torch.equal(b.prefix_indices, env.row(b)[:aligned_b])
    env.check(a, b)
    env.extend(a, 13)                                 # a finishes its prefill
    env.cache.cache_unfinished_req(a)
    env.check(a, b)
    assert torch.equal(env.row(a)[:aligned_b], env.row(b)[:aligned_b])
    env.cache.cache_finished_req(a)
    env.cache.cache_finished_req(b)
    assert env.cache.protected_size() == 0 and env.cache.evictable_size() == 20 - 20 % page_size
    env.cache.reset()
    assert env.alloc.available() == env.alloc.num_slots - page_size
    env.check()


@pytest.mark.parametrize("insert", [False, True])
def test_release_req(insert):
    env = Env(page_size=4)
    env.cache.insert(list(range(8)), env.slots(8))
    r = env.start("r", list(range(8)) + [9] * 7)
    assert r.kv_len == 8
    env.extend(r, 6)
    env.check(r)
    env.cache.release_req(r, insert=insert)
    assert r.req_pool_idx is None and r.last_node is None and r.kv_len == 0
    assert env.cache.protected_size() == 0
    assert env.cache.evictable_size() == (12 if insert else 8)
    env.check()
    env.cache.reset()
    assert env.alloc.available() == env.alloc.num_slots - 4


def test_release_of_a_req_without_row_only_unlocks():
    env = Env()
    env.cache.insert([1, 2, 3], env.slots(3))
    req = Req(rid="w", origin_input_ids=[1, 2, 3, 4], sampling_params=None)
    m = env.cache.match_prefix(req.all_ids)
    env.cache.inc_lock_ref(m.last_node)
    req.last_node = m.last_node
    env.cache.release_req(req, insert=False)
    assert env.cache.protected_size() == 0 and req.last_node is None


def test_page_size_must_match_allocator():
    alloc = SlotAllocator(64, 4)
    with pytest.raises(ValueError, match="page_size"):
        RadixCache(alloc, ReqToTokenPool(2, 8), page_size=1)
