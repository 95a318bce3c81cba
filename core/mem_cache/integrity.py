"""check_kv_integrity: every usable KV page is free, cached or owned by one request — never two,
never none.

Categories (all checked on the CPU, vectorized with bincount):
  free    allocator.free_slots()
  cached  cache.cached_slots()
  owned   row[len(prefix_indices):kv_len] of each request holding a req_to_token row
A page, not a slot, is the unit: with page_size > 1 a request's last page is partly unused but
still wholly its own. Page 0 (the dummy page) must be in no category. Also checked: each
request's prefix_indices equal the start of its row and are cached slots, owned slots sit at
offset position % page_size of a page shared only with their page-mates, rows are distinct and
not the dummy row, the dummy row is all zeros, and the cache's size counters match its slots.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_SHOW = 8   # how many offending entries an error message lists


@dataclass
class _Owned:
    slots: torch.Tensor      # int64 [N] owned slots of all requests, request-major, position order
    positions: torch.Tensor  # int64 [N] token position of each slot in its request
    owner: torch.Tensor      # int64 [N] index into the running request list


def check_kv_integrity(allocator, cache, running_reqs, req_to_token) -> None:
    """Raises AssertionError describing the first broken invariant."""
    reqs = [r for r in running_reqs if r.req_pool_idx is not None]
    num_slots, page_size = allocator.num_slots, allocator.page_size
    table = req_to_token.table.cpu()
    free = allocator.free_slots().cpu()
    cached = cache.cached_slots().cpu()

    _check_rows(reqs, table)
    owned = _owned_slots(reqs, table)
    for name, slots in (("free", free), ("cached", cached), ("owned", owned.slots)):
        _check_range(name, slots, num_slots)
    cached_count = torch.bincount(cached, minlength=num_slots)
    _check_cache_counters(cache, cached, cached_count)
    _check_prefixes(reqs, table, cached_count, page_size)
    _check_owned_layout(reqs, owned, page_size)
    _check_pages(reqs, free, cached_count, owned, num_slots, page_size)


def _check_rows(reqs, table: torch.Tensor) -> None:
    assert not bool(table[0].any()), (
        f"dummy row 0 of req_to_token is not all zeros: nonzero at columns "
        f"{table[0].nonzero().flatten().tolist()[:_SHOW]}")
    seen: dict[int, str] = {}
    for r in reqs:
        assert r.req_pool_idx != 0, f"req {r.rid} uses the dummy row 0"
        assert r.req_pool_idx not in seen, (
            f"reqs {seen[r.req_pool_idx]} and {r.rid} share req_to_token row {r.req_pool_idx}")
        seen[r.req_pool_idx] = r.rid
        n_prefix = r.prefix_indices.numel()
        assert 0 <= n_prefix <= r.kv_len <= table.shape[1], (
            f"req {r.rid}: need 0 <= len(prefix_indices) ({n_prefix}) <= kv_len ({r.kv_len}) "
            f"<= max_context_len ({table.shape[1]})")


def _owned_slots(reqs, table: torch.Tensor) -> _Owned:
    if not reqs:
        empty = torch.empty(0, dtype=torch.int64)
        return _Owned(empty, empty, empty)
    rows = torch.tensor([r.req_pool_idx for r in reqs], dtype=torch.int64)
    starts = torch.tensor([r.prefix_indices.numel() for r in reqs], dtype=torch.int64)
    ends = torch.tensor([r.kv_len for r in reqs], dtype=torch.int64)
    width = int(ends.max())
    cols = torch.arange(width, dtype=torch.int64)
    mask = (cols >= starts[:, None]) & (cols < ends[:, None])          # [B, width]
    return _Owned(slots=table[rows, :width].to(torch.int64)[mask],
                  positions=cols.expand(len(reqs), width)[mask],
                  owner=torch.arange(len(reqs))[:, None].expand(len(reqs), width)[mask])


def _check_range(name: str, slots: torch.Tensor, num_slots: int) -> None:
    bad = (slots < 0) | (slots >= num_slots)
    assert not bool(bad.any()), (
        f"{name} slots out of range 0..{num_slots - 1}: {slots[bad].tolist()[:_SHOW]}")


def _check_cache_counters(cache, cached: torch.Tensor, cached_count: torch.Tensor) -> None:
    twice = (cached_count > 1).nonzero().flatten()
    assert twice.numel() == 0, f"slots held by two cache entries: {twice.tolist()[:_SHOW]}"
    ev, pr = cache.evictable_size(), cache.protected_size()
    assert ev >= 0 and pr >= 0 and ev + pr == cached.numel(), (
        f"cache counters evictable={ev} + protected={pr} != {cached.numel()} cached slots")


def _check_prefixes(reqs, table: torch.Tensor, cached_count: torch.Tensor, page_size: int) -> None:
    for r in reqs:
        prefix = r.prefix_indices.cpu().to(torch.int64)
        n = prefix.numel()
        assert n % page_size == 0, (
            f"req {r.rid}: len(prefix_indices) {n} is not a multiple of page_size {page_size}")
        row = table[r.req_pool_idx, :n].to(torch.int64)
        assert torch.equal(prefix, row), (
            f"req {r.rid}: prefix_indices differ from req_to_token row {r.req_pool_idx} at "
            f"positions {(prefix != row).nonzero().flatten().tolist()[:_SHOW]}")
        if n:
            missing = cached_count[prefix] == 0
            assert not bool(missing.any()), (
                f"req {r.rid}: prefix slots not held by the cache: {prefix[missing].tolist()[:_SHOW]}")


def _check_owned_layout(reqs, owned: _Owned, page_size: int) -> None:
    """Slot of position p has offset p % page_size; positions of one page-block share a page."""
    if page_size == 1 or owned.slots.numel() == 0:
        return
    misplaced = (owned.slots % page_size) != (owned.positions % page_size)
    if bool(misplaced.any()):
        i = int(misplaced.nonzero()[0])
        raise AssertionError(f"req {reqs[int(owned.owner[i])].rid}: position "
                             f"{int(owned.positions[i])} at slot {int(owned.slots[i])}, offset "
                             f"{int(owned.slots[i]) % page_size} in its page (page_size {page_size})")
    page, block = owned.slots // page_size, owned.positions // page_size
    same_block = (owned.owner[1:] == owned.owner[:-1]) & (block[1:] == block[:-1])
    split = same_block & (page[1:] != page[:-1])
    if bool(split.any()):
        i = int(split.nonzero()[0]) + 1
        raise AssertionError(f"req {reqs[int(owned.owner[i])].rid}: positions "
                             f"{int(owned.positions[i]) - 1} and {int(owned.positions[i])} share a "
                             f"page block but sit in pages {int(page[i - 1])} and {int(page[i])}")


def _check_pages(reqs, free, cached_count, owned: _Owned, num_slots: int, page_size: int) -> None:
    num_pages = num_slots // page_size
    free_pages = torch.bincount(free // page_size, minlength=num_pages) > 0
    cached_per_page = cached_count.view(num_pages, page_size).sum(dim=1)
    partial = (cached_per_page > 0) & (cached_per_page < page_size)
    assert not bool(partial.any()), (
        f"pages only partly cached: {partial.nonzero().flatten().tolist()[:_SHOW]}")
    # number of distinct requests owning each page
    owner_page = torch.unique(owned.owner * num_pages + owned.slots // page_size)
    owners_per_page = torch.bincount(owner_page % num_pages, minlength=num_pages)
    total = free_pages.long() + (cached_per_page > 0).long() + owners_per_page
    expected = torch.ones(num_pages, dtype=torch.int64)
    expected[0] = 0   # the dummy page belongs to nobody
    bad = (total != expected).nonzero().flatten()
    if bad.numel():
        lines = [_describe_page(int(p), free_pages, cached_per_page, owned, reqs, page_size)
                 for p in bad[:_SHOW]]
        raise AssertionError(f"{bad.numel()} KV page(s) not in exactly one of free/cached/owned "
                             f"(page_size {page_size}): " + "; ".join(lines))


def _describe_page(page: int, free_pages, cached_per_page, owned: _Owned, reqs, page_size) -> str:
    owners = sorted({reqs[int(o)].rid for o in owned.owner[owned.slots // page_size == page]})
    kind = "dummy page" if page == 0 else "page"
    return (f"{kind} {page} (slots {page * page_size}..{(page + 1) * page_size - 1}): "
            f"free={int(free_pages[page])} cached={int(cached_per_page[page] > 0)} "
            f"owned_by={owners}")
