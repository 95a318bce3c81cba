"""SlotAllocator: hands out KV slots of the pool in pages of ``page_size`` slots.

Slot s lives in page ``s // page_size`` at offset ``s % page_size``. Page 0 (slots
0 .. page_size-1) is the dummy page that padded batch rows write to: it is never handed out.

Invariant kept for every sequence: the slot of token position p has offset ``p % page_size``
in its page, and positions ``k*page_size .. (k+1)*page_size-1`` share one page. A page therefore
belongs to exactly one owner (a request or one prefix-cache node), and freeing is per page.

Free pages are kept as one tensor that is consumed from the front plus a list of freed chunks
that is concatenated only when the front runs short, so both alloc and free are amortized
O(pages touched). A bool map per page catches double frees.
"""
from __future__ import annotations

import torch


class SlotAllocator:
    def __init__(self, num_slots: int, page_size: int = 1, device="cpu"):
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if num_slots % page_size != 0:
            raise ValueError(f"num_slots ({num_slots}) must be a multiple of page_size ({page_size})")
        if num_slots // page_size < 2:
            raise ValueError(f"num_slots ({num_slots}) must hold the dummy page and at least one "
                             f"usable page of page_size {page_size}")
        self.num_slots = num_slots
        self.page_size = page_size
        self.num_pages = num_slots // page_size
        self.device = torch.device(device)
        self.clear()

    # ---- state --------------------------------------------------------------------------------
    def clear(self) -> None:
        """Every page except the dummy page 0 becomes free."""
        self._free_pages = torch.arange(1, self.num_pages, dtype=torch.int64, device=self.device)
        self._released: list[torch.Tensor] = []   # freed page chunks not yet merged into _free_pages
        self._num_free_pages = self.num_pages - 1
        self._is_free = torch.ones(self.num_pages, dtype=torch.bool, device=self.device)
        self._is_free[0] = False

    def available(self) -> int:
        """Free slots (= free pages * page_size)."""
        return self._num_free_pages * self.page_size

    def free_slots(self) -> torch.Tensor:
        """int64 [available()] every currently free slot, in ascending order."""
        pages = self._is_free.nonzero().flatten()
        return self._pages_to_slots(pages)

    # ---- allocation ---------------------------------------------------------------------------
    def pages_needed(self, prev_len: int, n: int) -> int:
        """New pages alloc_for_req(prev_len, _, n) would take; the tail of the page holding
        position prev_len-1 is used first when prev_len is not page-aligned."""
        if prev_len < 0 or n < 0:
            raise ValueError(f"prev_len and n must be >= 0, got prev_len={prev_len} n={n}")
        rest = n - self._tail_room(prev_len)
        return 0 if rest <= 0 else -(-rest // self.page_size)

    def alloc_for_req(self, prev_len: int, last_loc: int, n: int) -> torch.Tensor | None:
        """int64 [n] slots for positions prev_len .. prev_len+n-1 of a sequence whose position
        prev_len-1 sits at slot last_loc (ignored when prev_len % page_size == 0).
        None, with nothing allocated, if there are not enough free pages."""
        num_new = self.pages_needed(prev_len, n)
        if num_new > self._num_free_pages:
            return None
        tail = min(n, self._tail_room(prev_len))
        parts = []
        if tail > 0:
            self._check_last_loc(prev_len, last_loc)
            parts.append(torch.arange(last_loc + 1, last_loc + 1 + tail, dtype=torch.int64,
                                      device=self.device))
        if num_new > 0:
            parts.append(self._pages_to_slots(self._take_pages(num_new))[: n - tail])
        if not parts:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def alloc_decode(self, prev_lens: list[int], last_locs: list[int] | None) -> torch.Tensor | None:
        """int64 [B]: one slot per sequence, for position prev_lens[i] (a decode step), taken in
        one go instead of B alloc_for_req calls. last_locs[i] is the slot of position
        prev_lens[i]-1 (only read when page_size > 1 and that page has room). None, with
        nothing allocated, if there are not enough free pages."""
        if self.page_size == 1:
            if len(prev_lens) > self._num_free_pages:
                return None
            return self._take_pages(len(prev_lens)).clone()
        fresh = [p % self.page_size == 0 for p in prev_lens]
        num_new = sum(fresh)
        if num_new > self._num_free_pages:
            return None
        new_pages = iter(self._take_pages(num_new).tolist())
        slots = []
        for is_fresh, prev_len, last_loc in zip(fresh, prev_lens, last_locs or [0] * len(prev_lens)):
            if is_fresh:
                slots.append(next(new_pages) * self.page_size)
                continue
            self._check_last_loc(prev_len, last_loc)
            slots.append(last_loc + 1)
        return torch.tensor(slots, dtype=torch.int64, device=self.device)

    def free(self, slots: torch.Tensor) -> None:
        """Frees the pages that contain these slots. Freeing a page that is already free, or the
        dummy page, raises AssertionError (both are bookkeeping bugs)."""
        if slots.numel() == 0:
            return
        pages = slots.to(device=self.device, dtype=torch.int64).flatten()
        if self.page_size > 1:
            pages = torch.div(pages, self.page_size, rounding_mode="floor")
        pages = torch.unique(pages)
        assert int(pages[0]) >= 1 and int(pages[-1]) < self.num_pages, (
            f"free: page out of range 1..{self.num_pages - 1}: {pages.tolist()[:8]}")
        already = self._is_free[pages]
        assert not bool(already.any()), (
            f"double free of page(s) {pages[already].tolist()[:8]} (page_size {self.page_size})")
        self._is_free[pages] = True
        self._released.append(pages)
        self._num_free_pages += int(pages.numel())

    # ---- helpers ------------------------------------------------------------------------------
    def _check_last_loc(self, prev_len: int, last_loc: int) -> None:
        """The slot of position prev_len-1 must sit at that position's offset in its page."""
        if last_loc % self.page_size != (prev_len - 1) % self.page_size:
            raise ValueError(f"last_loc {last_loc} has offset {last_loc % self.page_size} in its "
                             f"page but position {prev_len - 1} needs offset "
                             f"{(prev_len - 1) % self.page_size}")

    def _tail_room(self, prev_len: int) -> int:
        """Unused slots left in the page of position prev_len-1."""
        offset = prev_len % self.page_size
        return 0 if offset == 0 else self.page_size - offset

    def _take_pages(self, k: int) -> torch.Tensor:
        if self._free_pages.numel() < k:
            self._free_pages = torch.cat([self._free_pages, *self._released])
            self._released = []
        pages, self._free_pages = self._free_pages[:k], self._free_pages[k:]
        self._is_free[pages] = False
        self._num_free_pages -= k
        return pages

    def _pages_to_slots(self, pages: torch.Tensor) -> torch.Tensor:
        if self.page_size == 1:
            return pages.clone()
        offsets = torch.arange(self.page_size, dtype=torch.int64, device=pages.device)
        return (pages[:, None] * self.page_size + offsets).flatten()
