"""The tensors one forward pass needs.

Ownership of the three batch objects:
  Req            (core/scheduler/req.py) per-request state on the CPU; owned by the Scheduler.
  ScheduleBatch  (core/scheduler/schedule_batch.py) the requests the scheduler chose for one step and the
                 KV slots it allocated for them; built and owned by the Scheduler.
  ForwardBatch   (here) the device tensors derived from a ScheduleBatch; built by the
                 ModelRunner and passed explicitly to model.forward and attn_backend.forward.
                 Nothing reads it from module globals.

Shapes: T = total new tokens in the step (= B for decode), B = number of requests.

Tree-masked extend (speculative tree drafts, core/speculative.py): when ``spec_tree`` is set the
step is an extend whose new tokens of request i do not all see each other: new token r sees the
whole prefix and the new tokens c with ``spec_tree.mask(i)[r, c]`` (itself and its ancestors;
always c <= r, so a causal kernel's loop bounds still hold). Positions are depths, not row
indices. Attention backends that serve it list "spec_tree" in ``supported_features``.

Hidden-state capture (speculative draft heads read the target's hidden states): when
``capture_layers`` is set, the model's decoder stack (core/layers/decoder.py) stores in
``captured`` the residual stream after each listed layer i (``h + residual``, before the next
layer's norm: [T, hidden]) and, for ``FINAL_HIDDEN``, the final normed hidden state.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch

FINAL_HIDDEN = -1   # capture_layers entry: the hidden state after the final norm (what the LM head reads)

if TYPE_CHECKING:
    from kvyard.attention import AttentionBackend
    from kvyard.mem_cache.kv_pool import KVPool


class ForwardMode(enum.IntEnum):
    EXTEND = 1  # prefill of new tokens, possibly on top of a cached prefix (also chunked)
    DECODE = 2  # exactly one new token per request
    IDLE = 3    # nothing to run (keeps collective ranks in step)

    def is_extend(self) -> bool:
        return self == ForwardMode.EXTEND

    def is_decode(self) -> bool:
        return self == ForwardMode.DECODE


@dataclass
class TreeMask:
    """Per request of an extend step, which of its new tokens each new token sees.

    packed  [sum_i n_i * n_i] uint8 (1 = attend), request i's row-major [n_i, n_i] block starts at
            offsets[i]; requests without a tree get the causal (lower-triangular) block.
    offsets [B] int64 on the device; offsets_cpu the same on the host.
    """
    packed: torch.Tensor
    offsets: torch.Tensor
    offsets_cpu: list[int]
    sizes: list[int]                  # [B] n_i, the request's new tokens

    def mask(self, i: int) -> torch.Tensor:
        """bool [n_i, n_i] of request i."""
        n, start = self.sizes[i], self.offsets_cpu[i]
        return self.packed[start:start + n * n].view(n, n).bool()

    @classmethod
    def from_rows(cls, masks: list[list[list[bool]]], device) -> "TreeMask":
        """masks [B][n_i][n_i] (host lists) -> the packed device form."""
        flat, offsets, sizes = [], [], []
        for m in masks:
            offsets.append(len(flat))
            sizes.append(len(m))
            flat += [int(x) for row in m for x in row]
        return cls(packed=torch.tensor(flat, dtype=torch.uint8, device=device),
                   offsets=torch.tensor(offsets, dtype=torch.int64, device=device),
                   offsets_cpu=offsets, sizes=sizes)


@dataclass
class ForwardBatch:
    mode: ForwardMode
    batch_size: int
    input_ids: torch.Tensor          # [T] int64
    positions: torch.Tensor          # [T] int64 position of each new token in its sequence
    out_cache_loc: torch.Tensor      # [T] int64 KV slot each new token's k/v is written to
    req_pool_indices: torch.Tensor   # [B] int64 rows of req_to_token
    seq_lens: torch.Tensor           # [B] int64 KV length after this step (prefix + new)
    seq_lens_cpu: list[int]          # same as seq_lens, on the host
    extend_prefix_lens_cpu: list[int]  # [B] tokens already cached before this step
    extend_seq_lens_cpu: list[int]     # [B] new tokens this step (all 1 for decode)
    extend_start_loc: torch.Tensor     # [B] int64 offset of each request's first new token in T
    logits_indices: torch.Tensor       # [N] int64 rows of the hidden states that need logits
    req_to_token: torch.Tensor         # [R, C] int32 slot of token j of request row r
    kv_pool: "KVPool"
    attn_backend: "AttentionBackend"
    # free-form per-step data an attention backend computes in init_forward_metadata
    attn_metadata: Any = None
    # LoRA serving: each request's adapter slot (kvyard.lora.batch.LoRABatchInfo); None without LoRA
    lora: Any = None
    # graph/compile padding: the real batch size when batch_size counts padded rows
    real_batch_size: Optional[int] = None
    # [K] int64 rows whose final hidden state the step returns (return_hidden_states), or None
    hidden_indices: Optional[torch.Tensor] = None
    extras: dict = field(default_factory=dict)
    # hidden-state capture: layer ids (FINAL_HIDDEN for the final normed state) -> [T, hidden]
    capture_layers: Optional[tuple[int, ...]] = None
    captured: dict = field(default_factory=dict)
    # speculative tree verify: which new tokens each new token sees (module docstring); None: causal
    spec_tree: Optional[TreeMask] = None
    # a speculative verify step: every new token is one draft position after its request's cached
    # prefix and sees the prefix and its own chain (spec_tree None) or ancestors (spec_tree), so a
    # runner may compute each new token as a decode row of that sequence
    spec_verify: bool = False

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])
