"""RadixCache: a radix tree over token ids whose nodes own the KV slots of their tokens.

Tree invariants:
  - one tree per namespace (``None``: the base model; LoRA serving passes each request's
    adapter load id), so two namespaces never share a node. Each tree's root has an empty key; every other node has a non-empty key whose length is a multiple
    of page_size, and ``value`` (int64 slots) of the same length; ``value[i]`` holds the KV of
    token ``key[i]`` given all tokens on the path above it.
  - children are keyed by their first token (page_size 1) or by the tuple of their first page's
    tokens, so two siblings never share a first page and matching compares whole pages.
  - ``lock_ref`` of a node = number of lock holders at or below it (inc/dec walk to the root).
    A node with lock_ref > 0 is never evicted. ``evictable_size`` and ``protected_size`` are the
    token counts of nodes with lock_ref == 0 and > 0 respectively (root excluded).
  - ``last_access`` is a logical clock, bumped by every match/insert that walks through a node;
    eviction removes the unlocked leaf with the smallest one first (LRU).
"""
from __future__ import annotations

import heapq
from typing import Optional

import torch

from kvyard.mem_cache.prefix_cache import MatchResult, PrefixCache, detach_req, req_kv_slots


class RadixNode:
    __slots__ = ("key", "value", "parent", "children", "lock_ref", "last_access", "node_id")

    def __init__(self, key: list[int], value: torch.Tensor, parent: Optional["RadixNode"],
                 last_access: int, node_id: int):
        self.key = key
        self.value = value
        self.parent = parent
        self.children: dict = {}
        self.lock_ref = 0
        self.last_access = last_access
        self.node_id = node_id   # tie-break in the eviction heap

    def __repr__(self) -> str:
        return (f"RadixNode(id={self.node_id}, len={len(self.key)}, lock_ref={self.lock_ref}, "
                f"children={len(self.children)})")


class RadixCache(PrefixCache):
    def __init__(self, allocator, req_to_token, page_size: int = 1):
        super().__init__(allocator, req_to_token, page_size)
        self._clock = 0
        self._next_id = 0
        self._empty = torch.empty(0, dtype=torch.int64, device=allocator.device)
        self.root = self._new_node([], self._empty, None)
        self.root.lock_ref = 1   # a root is never a candidate for eviction
        self._roots: dict = {None: self.root}   # namespace -> root (parent None)
        self._evictable = 0
        self._protected = 0
        self._reset_counters()

    # ---- tree primitives ----------------------------------------------------------------------
    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _new_node(self, key, value, parent) -> RadixNode:
        self._next_id += 1
        return RadixNode(key, value, parent, self._clock, self._next_id)

    def _child_key(self, key: list[int]):
        return key[0] if self.page_size == 1 else tuple(key[: self.page_size])

    def _match_len(self, node_key: list[int], key: list[int]) -> int:
        """Length of the common prefix, rounded down to a page multiple."""
        n = min(len(node_key), len(key))
        if node_key[:n] != key[:n]:
            n = next(i for i in range(n) if node_key[i] != key[i])
        return n - n % self.page_size

    def _split(self, node: RadixNode, at: int) -> RadixNode:
        """Cut node after `at` tokens; returns the new upper node. The lower part keeps the
        original object, so a request whose last_node is `node` still locks the right path."""
        upper = self._new_node(node.key[:at], node.value[:at], node.parent)
        upper.lock_ref = node.lock_ref
        upper.last_access = node.last_access
        node.parent.children[self._child_key(node.key)] = upper
        node.key, node.value = node.key[at:], node.value[at:]
        node.parent = upper
        upper.children[self._child_key(node.key)] = node
        return upper

    def _root(self, namespace) -> RadixNode:
        root = self._roots.get(namespace)
        if root is None:
            root = self._roots[namespace] = self._new_node([], self._empty, None)
            root.lock_ref = 1
        return root

    def _walk(self, key: list[int], namespace=None):
        """Follow key down the namespace's tree, splitting the last node where the match ends
        inside it. Returns (deepest matched node, matched length, slot tensors along the path)."""
        node, matched, values = self._root(namespace), 0, []
        now = self._tick()
        while matched < len(key):
            rest = key[matched:]
            child = node.children.get(self._child_key(rest))
            if child is None:
                break
            child.last_access = now
            p = self._match_len(child.key, rest)
            if p < len(child.key):
                child = self._split(child, p)
            values.append(child.value)
            node, matched = child, matched + p
        return node, matched, values

    # ---- match / insert -----------------------------------------------------------------------
    def match_prefix(self, key: list[int], namespace=None) -> MatchResult:
        self._query_tokens += len(key)
        result = self._match(key, namespace)
        self._hit_tokens += int(result.indices.numel())
        return result

    def _match(self, key: list[int], namespace=None) -> MatchResult:
        key = key[: len(key) - len(key) % self.page_size]
        node, _, values = self._walk(key, namespace)
        indices = torch.cat(values) if values else self._empty
        return MatchResult(indices=indices, last_node=node)

    def insert(self, key: list[int], slots: torch.Tensor, namespace=None) -> int:
        """Cache slots for key; returns how many leading tokens were already cached (the
        caller's slots for those are duplicates the tree does not take)."""
        if len(key) != slots.numel():
            raise ValueError(f"insert: key has {len(key)} tokens but slots has {slots.numel()}")
        if len(key) % self.page_size:
            raise ValueError(f"insert: key length {len(key)} is not a multiple of page_size "
                             f"{self.page_size}")
        node, matched, _ = self._walk(key, namespace)
        if matched < len(key):
            leaf = self._new_node(list(key[matched:]), slots[matched:].to(torch.int64).clone(), node)
            node.children[self._child_key(leaf.key)] = leaf
            self._evictable += len(leaf.key)
        return matched

    # ---- locks ----------------------------------------------------------------------------------
    def inc_lock_ref(self, node) -> None:
        while node.parent is not None:
            if node.lock_ref == 0:
                self._evictable -= len(node.key)
                self._protected += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def dec_lock_ref(self, node) -> None:
        while node.parent is not None:
            assert node.lock_ref > 0, f"dec_lock_ref on unlocked {node!r}"
            if node.lock_ref == 1:
                self._evictable += len(node.key)
                self._protected -= len(node.key)
            node.lock_ref -= 1
            node = node.parent

    def _unlock(self, node) -> None:
        if node is not None:
            self.dec_lock_ref(node)

    # ---- eviction -------------------------------------------------------------------------------
    def _nodes(self):
        stack = [c for root in self._roots.values() for c in root.children.values()]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def evict(self, num_tokens: int) -> int:
        """Frees LRU unlocked leaves until num_tokens slots are freed or nothing is left."""
        heap = [(n.last_access, n.node_id, n) for n in self._nodes()
                if not n.children and n.lock_ref == 0]
        heapq.heapify(heap)
        freed, victims = 0, []
        while freed < num_tokens and heap:
            _, _, node = heapq.heappop(heap)
            victims.append(node.value)
            freed += len(node.key)
            parent = node.parent
            del parent.children[self._child_key(node.key)]
            if parent.parent is not None and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, parent.node_id, parent))
        if victims:
            self.allocator.free(torch.cat(victims))
        self._evictable -= freed
        self._evicted_tokens += freed
        return freed

    def evictable_size(self) -> int:
        return self._evictable

    def protected_size(self) -> int:
        return self._protected

    def cached_slots(self) -> torch.Tensor:
        values = [n.value for n in self._nodes()]
        return torch.cat(values) if values else self._empty

    def reset(self) -> None:
        self.evict(self._evictable)
        assert self._evictable == 0, f"reset left {self._evictable} evictable tokens"
        self._roots = {ns: r for ns, r in self._roots.items() if ns is None or r.children}
        self._reset_counters()

    def _reset_counters(self) -> None:
        self._hit_tokens = 0
        self._query_tokens = 0
        self._evicted_tokens = 0

    def stats(self) -> dict:
        return {"cached_tokens": self._evictable + self._protected,
                "evictable": self._evictable, "protected": self._protected,
                "hit_tokens": self._hit_tokens, "query_tokens": self._query_tokens,
                "evicted_tokens": self._evicted_tokens}

    # ---- request lifecycle ----------------------------------------------------------------------
    def _insert_req_kv(self, req) -> tuple[torch.Tensor, int]:
        """Insert the page-aligned part of the request's KV; free the caller's duplicates.
        Returns (the row's slots [kv_len], aligned length)."""
        slots = req_kv_slots(self.req_to_token, req)
        aligned = req.kv_len - req.kv_len % self.page_size
        n_prefix = req.prefix_indices.numel()
        already = self.insert(req.all_ids[:aligned], slots[:aligned], req.cache_namespace)
        assert already >= n_prefix, (f"req {req.rid}: tree matched {already} tokens but the req "
                                     f"locks a prefix of {n_prefix}")
        # slots[:n_prefix] are the tree's own; slots[n_prefix:already] duplicate cached tokens
        self.allocator.free(slots[n_prefix:already])
        return slots, aligned

    def cache_finished_req(self, req) -> None:
        if req.req_pool_idx is not None:
            slots, aligned = self._insert_req_kv(req)
            self.allocator.free(slots[aligned:])   # the unaligned tail cannot be shared
        self._unlock(req.last_node)
        detach_req(self.req_to_token, req)

    def cache_unfinished_req(self, req) -> None:
        _, aligned = self._insert_req_kv(req)
        n_prefix = req.prefix_indices.numel()
        match = self._match(req.all_ids[:aligned], req.cache_namespace)
        assert match.indices.numel() == aligned, (
            f"req {req.rid}: re-match found {match.indices.numel()} of {aligned} inserted tokens")
        # point the row at the tree's slots where the req's duplicates were just freed
        self.req_to_token.write(req.req_pool_idx, n_prefix, match.indices[n_prefix:])
        self.inc_lock_ref(match.last_node)
        self._unlock(req.last_node)
        req.prefix_indices = match.indices
        req.last_node = match.last_node

    def release_req(self, req, insert: bool) -> None:
        if insert:
            self.cache_finished_req(req)
            return
        if req.req_pool_idx is not None:
            slots = req_kv_slots(self.req_to_token, req)
            self.allocator.free(slots[req.prefix_indices.numel():])
        self._unlock(req.last_node)
        detach_req(self.req_to_token, req)
