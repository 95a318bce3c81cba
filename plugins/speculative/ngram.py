"""NGRAM: draft tokens by matching the recent context against earlier text, no draft model.

For a request whose tokens end in ``... a b c``, the longest suffix (``max_match_window_size``
down to ``min_match_window_size`` tokens) that also occurs earlier in its own prompt + output
proposes the tokens that followed its most recent earlier occurrence (copy-heavy work: rewriting
or continuing a given passage, code edits, quoting). When the request's own text has no match,
an n-gram cache shared across requests (``ngram_capacity`` entries, least recently used evicted)
is asked: it maps each n-gram of recently seen text to the tokens that followed it.

Drafts are a single chain (the longest continuation); verification keeps what the target itself
produces, so a wrong guess costs one verify row, never a wrong token.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

from kvyard.speculative import DraftContext, DraftInput, SpeculativeAlgorithm, SpeculativeConfig

SCAN_LIMIT = 4096          # only the last this-many tokens of a request are searched for a match
CACHE_SCAN = 1024          # the shared cache records n-grams of the last this-many prompt tokens


class NgramCache:
    """n-gram (tuple of ids) -> the tokens that followed it last time; LRU-bounded."""

    def __init__(self, capacity: int, windows: range, branch_length: int):
        self.capacity = capacity
        self.windows = windows
        self.branch_length = branch_length
        self._map: "OrderedDict[tuple[int, ...], tuple[int, ...]]" = OrderedDict()

    def add(self, tokens: Sequence[int]) -> None:
        """Records every n-gram of ``tokens`` whose continuation is at least one token long."""
        tokens = list(tokens[-CACHE_SCAN:])
        for w in self.windows:
            for end in range(w, len(tokens)):
                key = tuple(tokens[end - w:end])
                self._map[key] = tuple(tokens[end:end + self.branch_length])
                self._map.move_to_end(key)
        while len(self._map) > self.capacity:
            self._map.popitem(last=False)

    def lookup(self, tokens: Sequence[int]) -> tuple[int, ...]:
        for w in reversed(self.windows):
            if len(tokens) >= w:
                hit = self._map.get(tuple(tokens[-w:]))
                if hit:
                    return hit
        return ()


def match_in_context(tokens: Sequence[int], windows: range, limit: int) -> list[int]:
    """The continuation (up to ``limit`` tokens) of the most recent earlier occurrence of the
    longest suffix of ``tokens`` whose length is in ``windows``; [] when none occurs."""
    tokens = tokens[-SCAN_LIMIT:]
    n = len(tokens)
    for w in reversed(windows):
        if w >= n:
            continue
        suffix = list(tokens[n - w:])
        for start in range(n - w - 1, -1, -1):   # most recent first; never the suffix itself
            if tokens[start] == suffix[0] and list(tokens[start:start + w]) == suffix:
                follow = list(tokens[start + w:start + w + limit])
                if follow:
                    return follow
    return []


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

    def propose(self, requests: Sequence[DraftInput]) -> list[list[int]]:
        return [self._propose_one(r) for r in requests]

    def _propose_one(self, req: DraftInput) -> list[int]:
        limit = min(req.max_draft_len, self.config.ngram_branch_length)
        if limit <= 0:
            return []
        if req.rid not in self._seen:           # the prompt feeds the shared cache once
            self._seen.add(req.rid)
            self.cache.add(req.token_ids)
        draft: Optional[list[int]] = match_in_context(req.token_ids, self.windows, limit)
        if not draft:
            draft = list(self.cache.lookup(req.token_ids)[:limit])
        return draft

    def accepted(self, rid: str, tokens: Sequence[int]) -> None:
        """Nothing per step: the request's own text is searched directly."""

    def release(self, rid: str) -> None:
        self._seen.discard(rid)
