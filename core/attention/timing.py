"""A quick synthetic timing of an attention backend on a model's head shapes.

backend_select uses it to resolve ``--attention-backend auto`` on the CPU, where which backend
is faster depends on the head shapes, the dtype and the machine. One layer, through the
backend's own ``init_forward_metadata`` + ``forward`` (the k/v write included) on a small
paged pool whose pages are scattered as in a running server:
  extend  2 requests x 64 new tokens on 64 cached ones (T = 128 queries)
  decode  8 requests, one new token each over 192 cached ones
After one untimed warm-up of each (kernel builds, lazy imports), the best of up to 3 runs
counts (one when a run is slow); a candidate whose extend step alone already loses is not
timed on decode. On SmolLM2's shapes (2 cores) the timed steps took ~2 ms with torch_native and
~22 ms with FlexAttention (extend only: it lost there); FlexAttention's first call in a process
adds torch's one-time setup, ~1 s in a scheduler process (which has imported torch._dynamo
already), so "auto" added 0.3-1.7 s to a 12 s start-up.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Optional

import torch

from kvyard.attention import AttentionConfig
from kvyard.forward_batch import ForwardBatch, ForwardMode
from kvyard.layers.attention import Attention
from kvyard.mem_cache.kv_pool import KVPool

EXTEND_REQS, EXTEND_PREFIX, EXTEND_NEW = 2, 64, 64
DECODE_REQS, DECODE_CACHED = 8, 192


@dataclass(frozen=True)
class AttentionTiming:
    extend_s: float                    # one extend step of one layer
    decode_s: Optional[float] = None   # one decode step of one layer; None: not timed (see give_up_s)

    @property
    def total_s(self) -> float:
        return self.extend_s + (self.decode_s if self.decode_s is not None else float("inf"))

    def describe(self) -> str:
        decode = "decode not timed" if self.decode_s is None else f"decode {self.decode_s * 1e3:.2f} ms"
        return f"extend {self.extend_s * 1e3:.2f} ms + {decode}"


class _SyntheticPool:
    """KV pool and req_to_token rows for ``reqs`` requests of up to ``context`` tokens; each
    request's pages are drawn from a shuffled page list (page 0 stays the dummy page)."""

    def __init__(self, config: AttentionConfig, reqs: int, context: int, seed: int = 0):
        page = config.page_size
        pages_per_req = -(-context // page)
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(reqs * pages_per_req, generator=gen) + 1
        self.pool = KVPool((reqs * pages_per_req + 1) * page, 1, config.num_kv_heads, config.head_dim,
                           config.dtype, "cpu")
        for buf in self.pool.k_buffers + self.pool.v_buffers:
            buf.normal_(generator=gen)
        offsets = torch.arange(pages_per_req * page)
        pages = order.view(reqs, pages_per_req).repeat_interleave(page, dim=1)
        self.table = torch.zeros(reqs + 1, pages_per_req * page, dtype=torch.int32)
        self.table[1:] = (pages * page + offsets % page).to(torch.int32)

    def batch(self, mode: ForwardMode, prefix_lens: list[int], new_lens: list[int], backend) -> ForwardBatch:
        long = dict(dtype=torch.int64)
        rows = list(range(1, len(prefix_lens) + 1))
        seq_lens = [p + n for p, n in zip(prefix_lens, new_lens)]
        positions = [pos for p, s in zip(prefix_lens, seq_lens) for pos in range(p, s)]
        loc = torch.cat([self.table[r, p:s] for r, p, s in zip(rows, prefix_lens, seq_lens)]).long()
        starts = torch.tensor([0] + new_lens[:-1], **long).cumsum(0)
        return ForwardBatch(
            mode=mode, batch_size=len(rows), input_ids=torch.zeros(len(positions), **long),
            positions=torch.tensor(positions, **long), out_cache_loc=loc,
            req_pool_indices=torch.tensor(rows, **long), seq_lens=torch.tensor(seq_lens, **long),
            seq_lens_cpu=seq_lens, extend_prefix_lens_cpu=list(prefix_lens), extend_seq_lens_cpu=list(new_lens),
            extend_start_loc=starts, logits_indices=starts + torch.tensor(new_lens, **long) - 1,
            req_to_token=self.table, kv_pool=self.pool, attn_backend=backend)


def time_backend(factory, config: AttentionConfig, repeats: int = 3, budget_s: float = 0.05,
                 give_up_s: float = float("inf")) -> AttentionTiming:
    """Times the backend ``factory(config)`` builds (on the CPU). Raises what the backend raises.
    give_up_s: when the extend step alone takes that long, the decode step is not timed (the
    backend has lost already)."""
    config = replace(config, device="cpu", max_batch_size=max(DECODE_REQS, EXTEND_REQS),
                     max_context_len=DECODE_CACHED + 1)
    backend = factory(config)
    synthetic = _SyntheticPool(config, DECODE_REQS, DECODE_CACHED + 1)
    layer = Attention(0, config.num_heads, config.num_kv_heads, config.head_dim)
    extend = synthetic.batch(ForwardMode.EXTEND, [EXTEND_PREFIX] * EXTEND_REQS, [EXTEND_NEW] * EXTEND_REQS, backend)
    decode = synthetic.batch(ForwardMode.DECODE, [DECODE_CACHED] * DECODE_REQS, [1] * DECODE_REQS, backend)
    extend_s = _best_of(backend, layer, extend, repeats, budget_s)
    if extend_s >= give_up_s:
        return AttentionTiming(extend_s)
    return AttentionTiming(extend_s, _best_of(backend, layer, decode, repeats, budget_s))


@torch.inference_mode()
def _best_of(backend, layer: Attention, fb: ForwardBatch, repeats: int, budget_s: float) -> float:
    """Best time of up to ``repeats`` runs after a warm-up; no new run once the timed ones
    took ``budget_s`` (a slow backend is timed once)."""
    gen = torch.Generator().manual_seed(1)
    t, dtype = fb.num_tokens, fb.kv_pool.dtype
    q = torch.randn(t, layer.num_heads, layer.head_dim, generator=gen).to(dtype)
    k = torch.randn(t, layer.num_kv_heads, layer.head_dim, generator=gen).to(dtype)
    v = torch.randn(t, layer.num_kv_heads, layer.head_dim, generator=gen).to(dtype)
    best, spent = float("inf"), 0.0
    for run in range(repeats + 1):          # run 0 warms up
        start = time.perf_counter()
        backend.init_forward_metadata(fb)
        backend.forward(q, k, v, layer, fb)
        if run:
            took = time.perf_counter() - start
            best, spent = min(best, took), spent + took
            if spent >= budget_s:
                break
    return best
