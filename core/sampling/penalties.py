"""Penalty state of a running batch, kept on the device and applied without a per-request loop.

Shapes: B rows (requests), V vocab. Each penalty allocates its [B, V] state only when some row of
the batch uses it; otherwise the attribute is None and the step skips it.

  counts    [B, V] float32  times each token was generated (frequency / presence penalty)
  seen      [B, V] bool     token occurs in prompt or output (repetition penalty)
  stop_mask [B, V] bool     tokens that would end the request: eos (unless ignore_eos) and
                            stop_token_ids (min_new_tokens)

Invariant that makes filter/merge exact: a row whose coefficient is neutral (penalty 0,
repetition 1, min_new_tokens 0) holds zeros/False in that state, so rows from a batch without
the state can be appended as zeros.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass
class PenaltyState:
    vocab_size: int
    device: torch.device
    out_lens: torch.Tensor                       # [B] int64 tokens generated so far
    frequency: Optional[torch.Tensor] = None     # [B, 1] float32
    presence: Optional[torch.Tensor] = None      # [B, 1] float32
    counts: Optional[torch.Tensor] = None        # [B, V] float32
    repetition: Optional[torch.Tensor] = None    # [B, 1] float32
    seen: Optional[torch.Tensor] = None          # [B, V] bool
    min_new_tokens: Optional[torch.Tensor] = None  # [B] int64
    stop_mask: Optional[torch.Tensor] = None     # [B, V] bool

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_reqs(cls, reqs: Sequence, vocab_size: int, device, eos_token_ids: Sequence[int]) -> "PenaltyState":
        params = [r.sampling_params for r in reqs]
        f32 = dict(dtype=torch.float32, device=device)
        state = cls(vocab_size, torch.device(device),
                    out_lens=torch.tensor([len(r.output_ids) for r in reqs], dtype=torch.int64, device=device))
        if any(p.frequency_penalty != 0 or p.presence_penalty != 0 for p in params):
            state.frequency = torch.tensor([[p.frequency_penalty] for p in params], **f32)
            state.presence = torch.tensor([[p.presence_penalty] for p in params], **f32)
            used = [p.frequency_penalty != 0 or p.presence_penalty != 0 for p in params]
            state.counts = _token_counts([r.output_ids for r in reqs], used, vocab_size, device)
        if any(p.repetition_penalty != 1.0 for p in params):
            state.repetition = torch.tensor([[p.repetition_penalty] for p in params], **f32)
            used = [p.repetition_penalty != 1.0 for p in params]
            history = [list(r.origin_input_ids) + list(r.output_ids) for r in reqs]
            state.seen = _token_counts(history, used, vocab_size, device) > 0
        if any(p.min_new_tokens > 0 for p in params):
            state.min_new_tokens = torch.tensor([p.min_new_tokens for p in params], dtype=torch.int64,
                                                device=device)
            stops = [_ending_tokens(p, eos_token_ids, vocab_size) if p.min_new_tokens > 0 else []
                     for p in params]
            state.stop_mask = _token_counts(stops, [True] * len(stops), vocab_size, device) > 0
        return state

    @property
    def batch_size(self) -> int:
        return int(self.out_lens.shape[0])

    # -- the step ---------------------------------------------------------------------------
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] float32 -> penalized logits (new tensor when any penalty is active)."""
        if self.seen is not None:
            # HF semantics: positive logits shrink, negative ones grow, for tokens seen before
            scaled = torch.where(logits > 0, logits / self.repetition, logits * self.repetition)
            logits = torch.where(self.seen, scaled, logits)
        if self.counts is not None:
            # OpenAI semantics over generated tokens only
            logits = logits - self.frequency * self.counts - self.presence * (self.counts > 0)
        if self.stop_mask is not None:
            blocked = self.stop_mask & (self.out_lens < self.min_new_tokens).unsqueeze(1)
            logits = logits.masked_fill(blocked, float("-inf"))
        return logits

    def update(self, next_ids: torch.Tensor) -> None:
        """Record the token each row just generated. next_ids [B] int64 on the device."""
        self.out_lens += 1
        column = next_ids.view(-1, 1)
        if self.counts is not None:
            # rows that do not use the penalty stay zero (see the module invariant)
            used = ((self.frequency != 0) | (self.presence != 0)).float()
            self.counts.scatter_add_(1, column, used)
        if self.seen is not None:
            # rows without a repetition penalty write False over False
            self.seen.scatter_(1, column, self.repetition != 1.0)

    # -- keeping rows aligned with the batch --------------------------------------------------
    def filter(self, keep: torch.Tensor) -> None:
        """Keep rows ``keep`` ([K] int64 on the device), in that order."""
        self.out_lens = self.out_lens[keep]
        for name in _ROW_FIELDS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[keep])

    def drop_unused(self, params: Sequence) -> None:
        """Free state no row uses any more. params: [B] the rows' SamplingParams, host-side."""
        if not any(p.frequency_penalty != 0 or p.presence_penalty != 0 for p in params):
            self.frequency = self.presence = self.counts = None
        if not any(p.repetition_penalty != 1.0 for p in params):
            self.repetition = self.seen = None
        if not any(p.min_new_tokens > 0 for p in params):
            self.min_new_tokens = self.stop_mask = None

    def merge(self, other: "PenaltyState") -> None:
        """Append other's rows. State only one side has is zero-filled for the other side."""
        for name in _ROW_FIELDS:
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine is None and theirs is None:
                continue
            mine = mine if mine is not None else _neutral(name, self.batch_size, theirs)
            theirs = theirs if theirs is not None else _neutral(name, other.batch_size, mine)
            setattr(self, name, torch.cat([mine, theirs]))
        self.out_lens = torch.cat([self.out_lens, other.out_lens])


# every per-row tensor except out_lens (merged separately since it always exists)
_ROW_FIELDS = ("frequency", "presence", "counts", "repetition", "seen", "min_new_tokens", "stop_mask")
_NEUTRAL_VALUE = {"repetition": 1.0}


def _neutral(name: str, rows: int, like: torch.Tensor) -> torch.Tensor:
    """Rows of state for requests that do not use the penalty: zeros / False / repetition 1."""
    shape = (rows,) + tuple(like.shape[1:])
    return torch.full(shape, _NEUTRAL_VALUE.get(name, 0), dtype=like.dtype, device=like.device)


def _token_counts(rows: Sequence[Sequence[int]], used: Sequence[bool], vocab_size: int, device) -> torch.Tensor:
    """[B, V] float32 counts of each row's tokens; rows with used=False stay zero. Built once."""
    counts = torch.zeros(len(rows), vocab_size, dtype=torch.float32, device=device)
    row_idx = [i for i, ids in enumerate(rows) if used[i] for _ in ids]
    tok_idx = [t for i, ids in enumerate(rows) if used[i] for t in ids]
    if tok_idx:
        counts.index_put_((torch.tensor(row_idx, device=device), torch.tensor(tok_idx, device=device)),
                          torch.ones(len(tok_idx), device=device), accumulate=True)
    return counts


def _ending_tokens(params, eos_token_ids: Sequence[int], vocab_size: int) -> list[int]:
    """Tokens whose generation would end this request now. Ids outside the model's vocab (a
    tokenizer's extra eos) can never be sampled, so there is nothing to block for them."""
    ending = set(params.stop_token_ids or ())
    if not params.ignore_eos:
        ending.update(eos_token_ids)
    return sorted(t for t in ending if 0 <= t < vocab_size)
