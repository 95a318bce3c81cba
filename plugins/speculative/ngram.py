"""NGRAM: draft tokens by matching the recent context against earlier text, no draft model.

For a request whose tokens end in ``... a b c``, the longest suffix (``max_match_window_size``
down to ``min_match_window_size`` tokens) that also occurs earlier in its own prompt + output
proposes the tokens that followed its most recent earlier occurrence (copy-heavy work: rewriting
or continuing a given passage, code edits, quoting). When the request's own text has no match,
an n-gram cache shared across requests (``ngram_capacity`` entries, least recently used evicted)
is asked: it maps each n-gram of recently seen text to the tokens that followed it.

Chains (num_draft_tokens = num_steps + 1): the one continuation found first. Tries
(num_draft_tokens > num_steps + 1): up to ``max_bfs_breadth`` distinct continuations (earlier
occurrences most recent first, longer windows first, then the shared cache) merged into a trie
(build_trie) whose nodes at depth d have at most breadth(d) children, falling linearly from
``max_bfs_breadth`` at depth 1 to ``min_bfs_breadth`` at depth num_steps; nodes are emitted
breadth-first, children in the order found (BFS) or most frequent first (PROB), and the first
``num_draft_tokens - 1`` kept. Verification keeps what the target itself produces, so a wrong
guess costs a verify row, never a wrong token.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

from kvyard.speculative import DraftContext, DraftInput, DraftTree, SpeculativeAlgorithm, SpeculativeConfig

SCAN_LIMIT = 4096          # only the last this-many tokens of a request are searched for a match
CACHE_SCAN = 1024          # the shared cache records n-grams of the last this-many prompt tokens


class NgramCache:
    """n-gram (tuple of ids) -> the tokens that followed it last time; LRU-bounded."""

    def __init__(self, capacity: int, windows: range, branch_length: int):
        self.capacity = capacity
        self.windows = windows
        self.branch_length = branch_length
        self._map: "OrderedDict[tuple[int, ...], tuple[tuple[int, ...], ...]]" = OrderedDict()

    def add(self, tokens: Sequence[int], keep: int = 1) -> None:
        """Records every n-gram of ``tokens`` whose continuation is at least one token long; an
        n-gram keeps its ``keep`` most recent distinct continuations, newest first."""
        tokens = list(tokens[-CACHE_SCAN:])
        for w in self.windows:
            for end in range(w, len(tokens)):
                key = tuple(tokens[end - w:end])
                follow = tuple(tokens[end:end + self.branch_length])
                old = self._map.get(key, ())
                self._map[key] = ((follow,) + tuple(f for f in old if f != follow))[:keep]
                self._map.move_to_end(key)
        while len(self._map) > self.capacity:
            self._map.popitem(last=False)

    def lookup(self, tokens: Sequence[int]) -> tuple[int, ...]:
        hits = self.lookup_all(tokens, 1)
        return hits[0] if hits else ()

    def lookup_all(self, tokens: Sequence[int], breadth: int) -> list[tuple[int, ...]]:
        """Up to ``breadth`` distinct continuations, longest matching n-gram first."""
        out: list[tuple[int, ...]] = []
        for w in reversed(self.windows):
            if len(tokens) >= w:
                out += [f for f in self._map.get(tuple(tokens[-w:]), ()) if f not in out]
                if len(out) >= breadth:
                    break
        return out[:breadth]


def match_in_context(tokens: Sequence[int], windows: range, limit: int) -> list[int]:
    """The continuation (up to ``limit`` tokens) of the most recent earlier occurrence of the
    longest suffix of ``tokens`` whose length is in ``windows``; [] when none occurs."""
    found = matches_in_context(tokens, windows, limit, 1)
    return found[0] if found else []


def matches_in_context(tokens: Sequence[int], windows: range, limit: int, breadth: int) -> list[list[int]]:
    """Up to ``breadth`` distinct continuations (each up to ``limit`` tokens) of earlier
    occurrences of suffixes of ``tokens``: longer windows first, most recent occurrence first."""
    tokens = tokens[-SCAN_LIMIT:]
    n, out = len(tokens), []
    for w in reversed(windows):
        if w >= n:
            continue
        suffix = list(tokens[n - w:])
        for start in range(n - w - 1, -1, -1):
            if tokens[start] == suffix[0] and list(tokens[start:start + w]) == suffix:
                follow = list(tokens[start + w:start + w + limit])
                if follow and follow not in out:
                    out.append(follow)
                    if len(out) >= breadth:
                        return out
    return out


def build_trie(branches: Sequence[Sequence[int]], breadth: Sequence[int], max_nodes: int,
               by_count: bool = False) -> DraftTree:
    """A DraftTree of the token sequences ``branches`` merged by common prefixes. breadth[d - 1]
    caps the children of a node at depth d - 1 (the root: depth 0); nodes are emitted
    breadth-first, siblings in first-seen order (or most branches first when by_count), at most
    max_nodes of them; no node deeper than len(breadth)."""
    children: dict[tuple, dict[int, int]] = {(): {}}     # path -> {token: branches through it}
    for branch in branches:
        path: tuple = ()
        for depth, tok in enumerate(branch[:len(breadth)]):
            kids = children[path]
            if tok not in kids and len(kids) >= breadth[depth]:
                break
            kids[tok] = kids.get(tok, 0) + 1
            path = path + (tok,)
            children.setdefault(path, {})
    tokens, parents, frontier = [], [], [((), -1)]
    while frontier and len(tokens) < max_nodes:
        nxt = []
        for path, index in frontier:
            kids = list(children[path].items())
            if by_count:
                kids.sort(key=lambda kv: -kv[1])          # stable: first seen among equals
            for tok, _ in kids:
                if len(tokens) >= max_nodes:
                    break
                tokens.append(tok)
                parents.append(index)
                nxt.append((path + (tok,), len(tokens) - 1))
        frontier = nxt
    return DraftTree(tuple(tokens), tuple(parents))


class NgramAlgorithm(SpeculativeAlgorithm):
    name = "NGRAM"

    def __init__(self, config: SpeculativeConfig, context: DraftContext):
        super().__init__(config, context)
        lo, hi = config.ngram_min_match_window_size, config.ngram_max_match_window_size
        if not 1 <= lo <= hi:
            raise ValueError(f"speculative_ngram_min_match_window_size ({lo}) must be >= 1 and "
                             f"<= speculative_ngram_max_match_window_size ({hi})")
        self.windows = range(lo, hi + 1)
        self.cache = NgramCache(config.ngram_capacity, self.windows, config.ngram_branch_length)
        self._seen: set[str] = set()

    def propose(self, requests: Sequence[DraftInput]) -> list:
        return [self._propose_one(r) for r in requests]

    def _propose_one(self, req: DraftInput):
        limit = min(req.depth_limit, self.config.ngram_branch_length)
        if limit <= 0:
            return []
        if req.rid not in self._seen:           # the prompt feeds the shared cache once
            self._seen.add(req.rid)
            self.cache.add(req.token_ids, self.config.ngram_max_bfs_breadth if self.config.tree else 1)
        if self.config.tree:
            return self._trie(req, limit)
        draft: Optional[list[int]] = match_in_context(req.token_ids, self.windows, limit)
        if not draft:
            draft = list(self.cache.lookup(req.token_ids)[:limit])
        return draft

    def _trie(self, req: DraftInput, limit: int) -> DraftTree:
        cfg = self.config
        wide = cfg.ngram_max_bfs_breadth
        branches = matches_in_context(req.token_ids, self.windows, limit, wide)
        if len(branches) < wide:
            branches += [list(f[:limit]) for f in self.cache.lookup_all(req.token_ids, wide)
                         if list(f[:limit]) not in branches][:wide - len(branches)]
        return build_trie(branches, self.breadths(limit), req.max_draft_len, by_count=cfg.ngram_match_type == "PROB")

    def breadths(self, depth: int) -> list[int]:
        """Children allowed per node at depths 1 .. depth: from max_bfs_breadth at depth 1 down to
        min_bfs_breadth at depth num_steps, linearly."""
        lo, hi, steps = self.config.ngram_min_bfs_breadth, self.config.ngram_max_bfs_breadth, self.config.num_steps
        return [max(lo, round(hi - (hi - lo) * d / max(1, steps - 1))) for d in range(depth)]

    def accepted(self, rid: str, tokens: Sequence[int]) -> None:
        """Nothing per step: the request's own text is searched directly."""

    def release(self, rid: str) -> None:
        self._seen.discard(rid)
