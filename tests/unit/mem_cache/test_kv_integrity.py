"""check_kv_integrity catches each kind of bookkeeping bug, and a randomized scheduler simulation
(shared prefixes, chunked prefill, decode, finishes, aborts, retractions, eviction under memory
pressure) keeps every invariant after every step and leaks nothing."""
import random
from collections import deque

import pytest
import torch

from kvyard.mem_cache.allocator import SlotAllocator
from kvyard.mem_cache.chunk_cache import ChunkCache
from kvyard.mem_cache.integrity import check_kv_integrity
from kvyard.mem_cache.radix_cache import RadixCache
from kvyard.mem_cache.req_to_token import ReqToTokenPool
from kvyard.scheduler.req import Req


# ---- the check itself -------------------------------------------------------------------------
def _world(page_size=1):
    alloc = SlotAllocator(16 * page_size, page_size)
    pool = ReqToTokenPool(4, 32)
    return alloc, pool, RadixCache(alloc, pool, page_size)


def _req_with_kv(alloc, pool, rid, n):
    req = Req(rid=rid, origin_input_ids=list(range(n + 1)), sampling_params=None)
    req.req_pool_idx = pool.alloc()
    slots = alloc.alloc_for_req(0, -1, n)
    pool.write(req.req_pool_idx, 0, slots)
    req.kv_len = n
    return req


def test_consistent_state_passes():
    alloc, pool, cache = _world(4)
    cache.insert(list(range(8)), alloc.alloc_for_req(0, -1, 8))
    check_kv_integrity(alloc, cache, [_req_with_kv(alloc, pool, "a", 5)], pool)


def test_leaked_page_is_reported():
    alloc, pool, cache = _world()
    alloc.alloc_for_req(0, -1, 1)
    with pytest.raises(AssertionError, match=r"page 1 .*free=0 cached=0 owned_by=\[\]"):
        check_kv_integrity(alloc, cache, [], pool)


def test_slot_freed_behind_a_requests_back_is_reported():
    alloc, pool, cache = _world()
    req = _req_with_kv(alloc, pool, "a", 3)
    alloc.free(pool.table[req.req_pool_idx, 1:2])
    with pytest.raises(AssertionError, match=r"free=1 cached=0 owned_by=\['a'\]"):
        check_kv_integrity(alloc, cache, [req], pool)


def test_slot_owned_by_two_requests_is_reported():
    alloc, pool, cache = _world()
    a = _req_with_kv(alloc, pool, "a", 3)
    b = _req_with_kv(alloc, pool, "b", 3)
    pool.write(b.req_pool_idx, 0, pool.table[a.req_pool_idx, :1])
    with pytest.raises(AssertionError, match=r"owned_by=\['a', 'b'\]"):
        check_kv_integrity(alloc, cache, [a, b], pool)


def test_slot_both_cached_and_owned_is_reported():
    alloc, pool, cache = _world()
    a = _req_with_kv(alloc, pool, "a", 3)
    cache.insert([1, 2], pool.table[a.req_pool_idx, :2].long())
    with pytest.raises(AssertionError, match=r"cached=1 owned_by=\['a'\]"):
        check_kv_integrity(alloc, cache, [a], pool)


def test_prefix_indices_must_match_the_row_and_be_cached():
    alloc, pool, cache = _world()
    cached = alloc.alloc_for_req(0, -1, 2)
    cache.insert([0, 1], cached)
    a = _req_with_kv(alloc, pool, "a", 4)
    a.prefix_indices = cached
    with pytest.raises(AssertionError, match="prefix_indices differ"):
        check_kv_integrity(alloc, cache, [a], pool)
    b = _req_with_kv(alloc, pool, "b", 4)
    b.prefix_indices = pool.table[b.req_pool_idx, :2].long()
    with pytest.raises(AssertionError, match="not held by the cache"):
        check_kv_integrity(alloc, cache, [b], pool)


def test_slot_at_wrong_page_offset_is_reported():
    alloc, pool, cache = _world(4)
    a = _req_with_kv(alloc, pool, "a", 3)
    row = pool.table[a.req_pool_idx, :3].clone()
    pool.write(a.req_pool_idx, 0, row.flip(0))
    with pytest.raises(AssertionError, match="offset"):
        check_kv_integrity(alloc, cache, [a], pool)


def test_rows_and_dummy_row_are_checked():
    alloc, pool, cache = _world()
    a = _req_with_kv(alloc, pool, "a", 2)
    b = Req(rid="b", origin_input_ids=[1], sampling_params=None)
    b.req_pool_idx = a.req_pool_idx
    with pytest.raises(AssertionError, match="share req_to_token row"):
        check_kv_integrity(alloc, cache, [a, b], pool)
    pool.table[0, 3] = 5
    with pytest.raises(AssertionError, match="dummy row 0"):
        check_kv_integrity(alloc, cache, [a], pool)


# ---- randomized scheduler simulation ----------------------------------------------------------
def _prefix_hashes(ids: list[int]) -> list[int]:
    """hash of ids[:i+1] for every i: what the KV of token i depends on."""
    out, h = [], 17
    for t in ids:
        h = (h * 1_000_003 + t + 1) % 2_147_483_647
        out.append(h)
    return out


class Sim:
    """A small scheduler: admit with prefix match, chunked prefill, decode one token a step,
    finish, random abort/retraction, evict then retract when the pool runs short. Each slot's
    'KV' is the hash of the prefix it was computed for, so shared slots are checked for content."""

    MAX_RUNNING = 8
    CHUNK = 16

    def __init__(self, cache_cls, page_size: int, seed: int, num_reqs: int):
        self.rng = random.Random(seed)
        self.ps = page_size
        self.alloc = SlotAllocator(48 * page_size if page_size > 1 else 200, page_size)
        self.pool = ReqToTokenPool(self.MAX_RUNNING, 96)
        self.cache = cache_cls(self.alloc, self.pool, page_size)
        self.kv = torch.full((self.alloc.num_slots,), -1, dtype=torch.int64)
        self.prefixes = [[self.rng.randrange(40) for _ in range(self.rng.randrange(4, 40))]
                         for _ in range(6)]
        self.to_create = num_reqs
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.prefill_target: dict[str, int] = {}
        self.max_new: dict[str, int] = {}
        self.counts = dict(finished=0, aborted=0, retracted=0, pressure_retracts=0,
                           evicted=0, unfinished_cached=0)

    # -- requests arrive and are admitted --
    def arrive(self):
        for _ in range(self.rng.randrange(3)):
            if self.to_create == 0:
                return
            self.to_create -= 1
            prompt = self.rng.choice(self.prefixes) + [self.rng.randrange(40)
                                                       for _ in range(self.rng.randrange(1, 20))]
            req = Req(rid=f"r{self.to_create}", origin_input_ids=prompt, sampling_params=None)
            self.max_new[req.rid] = self.rng.randrange(1, 12)
            self.waiting.append(req)

    def admit(self):
        while self.waiting and len(self.running) < self.MAX_RUNNING:
            req = self.waiting.popleft()
            m = self.cache.match_prefix(req.all_ids[:-1])
            self.cache.inc_lock_ref(m.last_node)
            req.req_pool_idx = self.pool.alloc()
            self.pool.write(req.req_pool_idx, 0, m.indices)
            req.prefix_indices, req.last_node, req.kv_len = m.indices, m.last_node, m.indices.numel()
            self.prefill_target[req.rid] = req.seq_len
            self.running.append(req)

    # -- one forward step for one request --
    def compute(self, req: Req) -> bool:
        """Returns False when the pool could not hold the new tokens even after eviction."""
        target = self.prefill_target[req.rid]
        n = min(self.CHUNK, target - req.kv_len) if req.kv_len < target else 1
        last = int(self.pool.table[req.req_pool_idx, req.kv_len - 1]) if req.kv_len else -1
        need = self.alloc.pages_needed(req.kv_len, n) * self.ps
        if need > self.alloc.available():
            self.counts["evicted"] += self.cache.evict(need - self.alloc.available())
        slots = self.alloc.alloc_for_req(req.kv_len, last, n)
        if slots is None:
            return False
        self.pool.write(req.req_pool_idx, req.kv_len, slots)
        self.kv[slots] = torch.tensor(_prefix_hashes(req.all_ids)[req.kv_len: req.kv_len + n])
        req.kv_len += n
        if req.kv_len < target:
            self.cache.cache_unfinished_req(req)
            self.counts["unfinished_cached"] += 1
        else:
            req.output_ids.append(self.rng.randrange(40))   # "sample" the next token
        return True

    def step(self):
        self.arrive()
        self.admit()
        for req in list(self.running):
            event = self.rng.random()
            if event < 0.01:
                self.drop(req, insert=False, kind="aborted")
            elif event < 0.03:
                self.drop(req, insert=True, kind="retracted")
            elif not self.compute(req):
                self.drop(req, insert=True, kind="pressure_retracts")
            elif len(req.output_ids) >= self.max_new[req.rid]:
                self.running.remove(req)
                self.cache.cache_finished_req(req)
                self.counts["finished"] += 1
        check_kv_integrity(self.alloc, self.cache, self.running, self.pool)
        self.check_kv_content()

    def drop(self, req: Req, insert: bool, kind: str):
        self.running.remove(req)
        self.cache.release_req(req, insert=insert)
        self.counts[kind] += 1
        if kind != "aborted":
            self.waiting.appendleft(req)          # retracted: nothing lost, back in the queue

    def check_kv_content(self):
        for req in self.running:
            slots = self.pool.table[req.req_pool_idx, : req.kv_len].long()
            expected = torch.tensor(_prefix_hashes(req.all_ids)[: req.kv_len], dtype=torch.int64)
            assert torch.equal(self.kv[slots], expected), f"req {req.rid} reads foreign KV"

    def done(self) -> bool:
        return self.to_create == 0 and not self.waiting and not self.running


@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize("cache_cls", [RadixCache, ChunkCache])
def test_randomized_simulation_keeps_invariants_and_leaks_nothing(cache_cls, page_size):
    sim = Sim(cache_cls, page_size, seed=1234 + page_size, num_reqs=300)
    for _ in range(3000):
        if sim.done():
            break
        sim.step()
    assert sim.done(), f"simulation stalled: {sim.counts}"
    c = sim.counts
    assert c["finished"] + c["aborted"] == 300
    assert c["retracted"] > 0 and c["aborted"] > 0 and c["unfinished_cached"] > 0
    assert c["pressure_retracts"] > 0, "the pool never ran short: the test lost its pressure"
    if cache_cls is RadixCache:
        assert c["evicted"] > 0 and sim.cache.stats()["hit_tokens"] > 0
    sim.cache.reset()
    assert sim.cache.cached_slots().numel() == 0
    assert sim.alloc.available() == sim.alloc.num_slots - page_size
    assert sim.pool.available() == sim.MAX_RUNNING
    check_kv_integrity(sim.alloc, sim.cache, [], sim.pool)
