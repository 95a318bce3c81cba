"""An approximate, multi-tenant radix tree over request text: the cache-aware policy's guess of what
each worker (tenant) holds in its prefix cache.

Shape: one tree shared by all tenants; an edge is labelled by a non-empty string, a node's children
are keyed by the first character of their label. ``node.tenants`` maps tenant -> last access time.

Invariants:
- a tenant on a node is on every ancestor of that node (its prompt passed through them), so the
  tenants of a child are a subset of its parent's;
- ``chars[t]`` is the number of label characters on nodes that carry tenant t (its "tree size");
- a node without tenants is removed from its parent (the root is never removed).

It is approximate on purpose: it sees text, not tokens, it never hears about the workers' own
evictions, and it forgets with ``evict(max_chars)`` (least recently used leaves of each tenant first).
"""
from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field
from typing import Optional


@dataclass(eq=False)
class _Node:
    text: str = ""
    parent: Optional["_Node"] = None
    children: dict[str, "_Node"] = field(default_factory=dict)
    tenants: dict[str, float] = field(default_factory=dict)


def _common_len(a: str, b: str) -> int:
    """Length of the common prefix; bisection over C-speed slice compares (long prompts)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class ApproxRadixTree:
    def __init__(self) -> None:
        self.root = _Node()
        self.chars: dict[str, int] = {}

    # -- insert / match ------------------------------------------------------------------------
    def insert(self, text: str, tenant: str) -> None:
        """Records that ``tenant`` has seen ``text`` (and so, approximately, caches its prefixes)."""
        now = time.monotonic()
        node = self.root
        node.tenants[tenant] = now
        self.chars.setdefault(tenant, 0)
        i = 0
        while i < len(text):
            child = node.children.get(text[i])
            if child is None:
                child = _Node(text[i:], node)
                node.children[text[i]] = child
            else:
                k = _common_len(child.text, text[i:])
                if k < len(child.text):
                    child = self._split(child, k)
            if tenant not in child.tenants:
                self.chars[tenant] += len(child.text)
            child.tenants[tenant] = now
            i += len(child.text)
            node = child

    def _split(self, child: _Node, k: int) -> _Node:
        """Cuts ``child``'s label after k characters; returns the new upper node."""
        upper = _Node(child.text[:k], child.parent, {child.text[k]: child}, dict(child.tenants))
        child.parent.children[child.text[0]] = upper
        child.text, child.parent = child.text[k:], upper
        return upper  # chars[] unchanged: the same characters, now on two nodes

    def prefix_match(self, text: str, tenants: Optional[set[str]] = None) -> tuple[int, Optional[str]]:
        """Longest prefix of ``text`` in the tree -> (matched characters, the tenant that saw it
        most recently). Only ``tenants`` count when given; (0, None) when nothing matches."""
        node, i, best = self.root, 0, None
        while i < len(text):
            child = node.children.get(text[i])
            if child is None:
                break
            live = {t: ts for t, ts in child.tenants.items() if tenants is None or t in tenants}
            if not live:
                break
            k = _common_len(child.text, text[i:])
            i += k
            best = max(live, key=live.get)
            if k < len(child.text):
                break
            node = child
        return (i, best) if best is not None else (0, None)

    # -- forgetting ----------------------------------------------------------------------------
    def evict(self, max_chars: int) -> None:
        """Drops each tenant's least recently used leaves until it holds at most ``max_chars``."""
        for tenant in [t for t, n in self.chars.items() if n > max_chars]:
            heap = [(n.tenants[tenant], id(n), n) for n in self._nodes_of(tenant) if self._is_leaf_of(n, tenant)]
            heapq.heapify(heap)
            while heap and self.chars[tenant] > max_chars:
                _, _, node = heapq.heappop(heap)
                parent = self._drop(node, tenant)
                if parent is not None and parent is not self.root and self._is_leaf_of(parent, tenant):
                    heapq.heappush(heap, (parent.tenants[tenant], id(parent), parent))

    def remove_tenant(self, tenant: str) -> None:
        """Forgets every prompt of ``tenant`` (a removed worker)."""
        for node in sorted(self._nodes_of(tenant), key=self._depth, reverse=True):
            self._drop(node, tenant)
        self.root.tenants.pop(tenant, None)
        self.chars.pop(tenant, None)

    def _drop(self, node: _Node, tenant: str) -> Optional[_Node]:
        del node.tenants[tenant]
        self.chars[tenant] -= len(node.text)
        if not node.tenants:
            del node.parent.children[node.text[0]]
        return node.parent

    def _nodes_of(self, tenant: str) -> list[_Node]:
        out, stack = [], [c for c in self.root.children.values() if tenant in c.tenants]
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(c for c in node.children.values() if tenant in c.tenants)
        return out

    @staticmethod
    def _is_leaf_of(node: _Node, tenant: str) -> bool:
        return all(tenant not in c.tenants for c in node.children.values())

    @staticmethod
    def _depth(node: _Node) -> int:
        d = 0
        while node.parent is not None:
            node, d = node.parent, d + 1
        return d
