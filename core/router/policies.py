"""Routing policies: pick one of the healthy workers for a request.

Every policy sees the same inputs: the healthy workers (non-empty; the caller answers 503 otherwise)
with their in-flight counts, and the request's routing text. ``select`` returns the worker and the
decision's name (for the metrics); ``on_removed`` lets a stateful policy forget a worker.
"""
from __future__ import annotations

import itertools
import random
from typing import Protocol, Sequence

from kvyard.router.config import CacheAwareConfig
from kvyard.router.radix_tree import ApproxRadixTree


class Loaded(Protocol):
    url: str
    load: int  # in-flight requests sent by this router


class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def select(self, workers: Sequence[Loaded], text: str) -> tuple[Loaded, str]:
        return workers[next(self._counter) % len(workers)], "round_robin"

    def on_removed(self, url: str) -> None:
        pass


class Random(RoundRobin):
    name = "random"

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def select(self, workers, text):
        return self._rng.choice(list(workers)), "random"


class PowerOfTwo(Random):
    """Two random workers, the less loaded one wins."""
    name = "power_of_two"

    def select(self, workers, text):
        if len(workers) == 1:
            return workers[0], "power_of_two"
        a, b = self._rng.sample(list(workers), 2)
        return (a if a.load <= b.load else b), "power_of_two"


class ShortestQueue(RoundRobin):
    name = "shortest_queue"

    def select(self, workers, text):
        return min(workers, key=lambda w: w.load), "shortest_queue"


class CacheAware:
    """Longest prefix match in an approximate radix tree, unless the load is imbalanced.

    Decisions: ``balance`` (imbalanced: least loaded), ``cache_hit`` (match share above the
    threshold: the worker that saw the prefix), ``cache_miss`` (the worker with the smallest tree,
    i.e. the most room left in its cache). The chosen worker's tree gets the text either way."""
    name = "cache_aware"

    def __init__(self, cfg: CacheAwareConfig) -> None:
        self.cfg = cfg
        self.tree = ApproxRadixTree()
        self.matched_chars = 0  # prefix-hit estimate: characters predicted cached / routed
        self.routed_chars = 0

    def select(self, workers, text):
        by_url = {w.url: w for w in workers}
        loads = [w.load for w in workers]
        lo, hi = min(loads), max(loads)
        if hi - lo > self.cfg.balance_abs_threshold and hi > lo * self.cfg.balance_rel_threshold:
            chosen, decision = min(workers, key=lambda w: w.load), "balance"
            matched = self.tree.prefix_match(text, {chosen.url})[0]
        else:
            matched, url = self.tree.prefix_match(text, set(by_url))
            if url is not None and text and matched / len(text) > self.cfg.cache_threshold:
                chosen, decision = by_url[url], "cache_hit"
            else:
                chosen = min(workers, key=lambda w: (self.tree.chars.get(w.url, 0), w.load))
                decision = "cache_miss"
                matched = self.tree.prefix_match(text, {chosen.url})[0]
        self.tree.insert(text, chosen.url)
        self.matched_chars += matched
        self.routed_chars += len(text)
        return chosen, decision

    def evict(self) -> None:
        self.tree.evict(self.cfg.max_tree_size)

    def on_removed(self, url: str) -> None:
        self.tree.remove_tenant(url)


def make_policy(name: str, cache_cfg: CacheAwareConfig | None = None):
    if name == "cache_aware":
        return CacheAware(cache_cfg or CacheAwareConfig())
    table = {"round_robin": RoundRobin, "random": Random, "power_of_two": PowerOfTwo, "shortest_queue": ShortestQueue}
    if name not in table:
        raise ValueError(f"policy: unknown {name!r}; choose from cache_aware, {', '.join(table)}")
    return table[name]()
