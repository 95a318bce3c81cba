"""The router's approximate radix tree and its policies (no HTTP)."""
from dataclasses import dataclass

import pytest

from kvyard.router.config import CacheAwareConfig
from kvyard.router.policies import CacheAware, PowerOfTwo, RoundRobin, make_policy
from kvyard.router.radix_tree import ApproxRadixTree


def test_tree_longest_prefix_and_sizes():
    t = ApproxRadixTree()
    t.insert("hello world", "a")
    t.insert("hello there", "b")
    assert t.prefix_match("hello world, again") == (11, "a")
    assert t.prefix_match("hello there!") == (11, "b")
    assert t.prefix_match("hello") [0] == 5
    assert t.prefix_match("xyz") == (0, None)
    assert t.prefix_match("hello world", {"b"}) == (6, "b")
    assert t.chars == {"a": 11, "b": 11}


def test_tree_evicts_lru_leaves_and_removes_tenants():
    t = ApproxRadixTree()
    t.insert("aaaa-old", "w")
    t.insert("bbbb-new", "w")
    t.insert("aaaa-old", "v")
    t.evict(8)
    assert t.chars["w"] == 8
    assert t.prefix_match("bbbb-new", {"w"})[0] == 8
    assert t.prefix_match("aaaa-old", {"w"})[0] == 0
    assert t.prefix_match("aaaa-old")[0] == 8  # v keeps it
    t.remove_tenant("v")
    assert t.prefix_match("aaaa-old") == (0, None)
    assert "v" not in t.chars and not t.root.children.get("a")


@dataclass(eq=False)
class W:
    url: str
    load: int = 0


def test_cache_aware_sends_each_family_to_one_worker():
    p = CacheAware(CacheAwareConfig(cache_threshold=0.5, balance_abs_threshold=32))
    ws = [W("a"), W("b")]
    families = {f: f"system prompt of family {f} " * 4 for f in "xyzw"}
    chosen = {f: set() for f in families}
    for i in range(5):
        for f, prefix in families.items():
            chosen[f].add(p.select(ws, prefix + f"question {i}")[0].url)
    assert all(len(s) == 1 for s in chosen.values())
    assert {next(iter(s)) for s in chosen.values()} == {"a", "b"}  # misses spread by tree size
    assert p.matched_chars / p.routed_chars > 0.6


def test_cache_aware_balances_when_imbalanced():
    p = CacheAware(CacheAwareConfig(balance_abs_threshold=2, balance_rel_threshold=1.5))
    ws = [W("a"), W("b")]
    assert p.select(ws, "shared prefix 1")[0].url == "a"
    ws[0].load = 5
    w, decision = p.select(ws, "shared prefix 1")
    assert (w.url, decision) == ("b", "balance")


def test_simple_policies():
    ws = [W("a", 3), W("b", 0), W("c", 1)]
    rr = RoundRobin()
    assert [rr.select(ws, "")[0].url for _ in range(4)] == ["a", "b", "c", "a"]
    p2 = PowerOfTwo()
    assert all(p2.select(ws, "")[0].url != "a" for _ in range(20))
    assert make_policy("shortest_queue").select(ws, "")[0].url == "b"
    with pytest.raises(ValueError, match="policy"):
        make_policy("nope")


def test_tree_matches_long_texts_exactly():
    t = ApproxRadixTree()
    base = "".join(chr(0x4E00 + (i * 7919) % 5000) for i in range(20000))
    t.insert(base, "a")
    for cut in (0, 1, 777, 19999):
        probe = base[:cut] + "\x00" + base[cut + 1:]
        assert t.prefix_match(probe) == ((cut, "a") if cut else (0, None))
    assert t.prefix_match(base + "tail") == (20000, "a")
