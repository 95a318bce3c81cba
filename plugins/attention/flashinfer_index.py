"""flashinfer's page table for one step, built from kvyard's req_to_token (pure torch).

kvyard's pool keeps per layer k/v as [num_slots, Hkv, D]; slot s is offset ``s % P`` of page
``s // P`` (P = page_size), and the allocator keeps every sequence page-aligned: token j of a
request sits at offset ``j % P`` of the page that holds its tokens ``(j // P) * P ..``. Viewed as
[num_pages, P, Hkv, D] (flashinfer's "NHD" layout) the pool is therefore already a paged KV cache,
and a request of L tokens is described by
    its pages            req_to_token[row, 0::P][:ceil(L / P)] // P       (in token order)
    its last page's use  L - (ceil(L / P) - 1) * P                        (in 1 .. P)
flashinfer takes the pages of a batch packed request after request (CSR):
    kv_indptr        [B + 1] int32, host    request i owns kv_indices[kv_indptr[i]:kv_indptr[i + 1]]
    kv_indices       [N] int32, device      N = kv_indptr[B]
    kv_last_page_len [B] int32, host
and the new tokens of an extend step likewise: qo_indptr [B + 1] int32 (host), request i's queries
are rows qo_indptr[i]:qo_indptr[i + 1] of q.
The host parts come from host lengths, the device part from device tensors, so building the
table never waits for the device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class PagedKVIndex:
    kv_indptr: torch.Tensor          # [B + 1] int32, host
    kv_indices: torch.Tensor         # [N] int32, on req_to_token's device
    kv_last_page_len: torch.Tensor   # [B] int32, host

    @property
    def num_pages(self) -> int:
        return int(self.kv_indptr[-1])


def page_counts(seq_lens: Sequence[int], page_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pages per request [B], kv_indptr [B + 1], kv_last_page_len [B]), int32 on the host."""
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    lens = torch.tensor(list(seq_lens), dtype=torch.int32)
    if lens.numel() == 0:
        raise ValueError("seq_lens: a step needs at least one request")
    if int(lens.min()) < 1:
        raise ValueError(f"seq_lens: every request needs at least one KV token, got {lens.tolist()}")
    pages = (lens + (page_size - 1)) // page_size
    indptr = torch.zeros(lens.numel() + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(pages, 0, dtype=torch.int32)
    return pages, indptr, lens - (pages - 1) * page_size


def gather_page_ids(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, pages: torch.Tensor,
                    indptr: torch.Tensor, page_size: int) -> torch.Tensor:
    """kv_indices [N] int32 on req_to_token's device: page k of request i is the page of its
    token k * page_size. ``pages`` / ``indptr`` are the host tensors of ``page_counts``."""
    dev = req_to_token.device
    total = int(indptr[-1])
    counts = pages.to(device=dev, dtype=torch.int64, non_blocking=True)
    starts = indptr[:-1].to(device=dev, dtype=torch.int64, non_blocking=True)
    owner = torch.repeat_interleave(torch.arange(counts.numel(), device=dev), counts,
                                    output_size=total)                   # [N] request of each page
    page_no = torch.arange(total, device=dev) - starts[owner]            # [N] page within it
    rows = req_pool_indices.to(torch.int64)[owner]
    slots = req_to_token[rows, page_no * page_size]                      # first slot of each page
    ids = slots if page_size == 1 else torch.div(slots, page_size, rounding_mode="floor")
    return ids.to(torch.int32)


def build_paged_kv_index(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                         seq_lens: Sequence[int], page_size: int) -> PagedKVIndex:
    """The page table of a batch whose request i is req_to_token row req_pool_indices[i] with
    seq_lens[i] tokens of KV (after this step's new tokens are written)."""
    pages, indptr, last = page_counts(seq_lens, page_size)
    return PagedKVIndex(indptr, gather_page_ids(req_to_token, req_pool_indices, pages, indptr, page_size), last)


def qo_indptr(extend_lens: Sequence[int]) -> torch.Tensor:
    """[B + 1] int32 on the host: the q rows of each request's new tokens."""
    out = torch.zeros(len(extend_lens) + 1, dtype=torch.int32)
    out[1:] = torch.cumsum(torch.tensor(list(extend_lens), dtype=torch.int32), 0, dtype=torch.int32)
    return out


def paged_view(buffer: torch.Tensor, page_size: int) -> torch.Tensor:
    """A pool buffer [num_slots, Hkv, D] as flashinfer's NHD pages [num_pages, page_size, Hkv, D]
    (a view: no copy)."""
    slots, heads, dim = buffer.shape
    if slots % page_size:
        raise ValueError(f"page_size {page_size} does not divide the pool's {slots} slots")
    return buffer.view(slots // page_size, page_size, heads, dim)

