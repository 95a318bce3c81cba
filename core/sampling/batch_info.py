"""SamplingBatchInfo: the sampling tensors of a running batch, built once and kept in step.

Owned by the scheduler next to its running batch: ``from_reqs`` when a batch is formed,
``filter`` when requests finish or are retracted, ``merge`` when new requests join the decode
batch, ``update_after_step`` after every sampled token. Row i always describes the same request
as row i of the batch. Shapes: B rows, V vocab; every tensor lives on ``device``.

The host-side flags (need_top_k, ...) let the sampler skip work nobody asked for without reading
a device tensor; they are recomputed from the per-row params on filter/merge.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from kvyard.sampling.params import SamplingParams
from kvyard.sampling.penalties import PenaltyState

_SEED_MASK = (1 << 63) - 1  # seeds are stored as non-negative int64


@dataclass
class SamplingBatchInfo:
    vocab_size: int
    device: torch.device
    params: list[SamplingParams]       # [B] host-side, normalized
    temperatures: torch.Tensor         # [B, 1] float32 (1.0 for greedy rows)
    top_ps: torch.Tensor               # [B] float32
    top_ks: torch.Tensor               # [B] int64, vocab_size when off
    min_ps: torch.Tensor               # [B] float32
    seeds: torch.Tensor                # [B] int64
    greedy: torch.Tensor               # [B] bool, row takes argmax
    penalties: PenaltyState
    logit_bias: Optional[torch.Tensor] = None   # [B, V] float32 additive, None when nobody has one
    vocab_mask: Optional[torch.Tensor] = None   # [B, V] bool, True = allowed; set by grammars per step
    need_top_k: bool = False
    need_top_p: bool = False
    need_min_p: bool = False
    need_custom: bool = False          # some row selected a custom logit processor
    is_all_greedy: bool = True

    @classmethod
    def from_reqs(cls, reqs: Sequence, vocab_size: int, device: Union[str, torch.device] = "cpu",
                  eos_token_ids: Sequence[int] = ()) -> "SamplingBatchInfo":
        """reqs: objects with .sampling_params (normalized), .output_ids, .origin_input_ids and
        .sampling_seed. eos_token_ids: the model's end tokens, blocked during min_new_tokens."""
        device = torch.device(device)
        params = [r.sampling_params for r in reqs]
        f32 = dict(dtype=torch.float32, device=device)
        info = cls(
            vocab_size=vocab_size, device=device, params=params,
            temperatures=torch.tensor([[p.temperature] for p in params], **f32).view(-1, 1),
            top_ps=torch.tensor([p.top_p for p in params], **f32),
            top_ks=torch.tensor([_top_k_or_vocab(p, vocab_size) for p in params], dtype=torch.int64,
                                device=device),
            min_ps=torch.tensor([p.min_p for p in params], **f32),
            seeds=torch.tensor([r.sampling_seed & _SEED_MASK for r in reqs], dtype=torch.int64,
                               device=device),
            greedy=torch.tensor([p.is_greedy for p in params], dtype=torch.bool, device=device),
            penalties=PenaltyState.from_reqs(reqs, vocab_size, device, eos_token_ids),
            logit_bias=_dense_logit_bias(params, vocab_size, device),
        )
        info._refresh_flags()
        return info

    @property
    def batch_size(self) -> int:
        return len(self.params)

    def update_after_step(self, next_ids: torch.Tensor) -> None:
        """next_ids [B] int64 on the device: the token each row just generated."""
        self.penalties.update(next_ids)

    # -- keeping rows aligned with the batch --------------------------------------------------
    def filter(self, keep: Union[list[int], torch.Tensor]) -> None:
        """Keep rows ``keep``, in that order (requests finished or retracted are dropped)."""
        keep_list = keep.tolist() if isinstance(keep, torch.Tensor) else list(keep)
        index = torch.tensor(keep_list, dtype=torch.int64, device=self.device)
        self.params = [self.params[i] for i in keep_list]
        for name in _ROW_TENSORS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[index])
        self.penalties.filter(index)
        self.penalties.drop_unused(self.params)
        if self.logit_bias is not None and not any(p.logit_bias for p in self.params):
            self.logit_bias = None
        self._refresh_flags()

    def merge(self, other: "SamplingBatchInfo") -> None:
        """Append other's rows (requests joining the running batch)."""
        if other.vocab_size != self.vocab_size:
            raise ValueError(f"vocab_size mismatch in merge: {self.vocab_size} vs {other.vocab_size}")
        for name in _ROW_TENSORS:
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine is None and theirs is None:
                continue
            fill = name == "vocab_mask"  # missing grammar rows allow everything; missing bias is 0
            mine = mine if mine is not None else _filled(self.batch_size, theirs, fill)
            theirs = theirs if theirs is not None else _filled(other.batch_size, mine, fill)
            setattr(self, name, torch.cat([mine, theirs]))
        self.penalties.merge(other.penalties)
        self.params = self.params + other.params
        self._refresh_flags()

    def _refresh_flags(self) -> None:
        sampled = [p for p in self.params if not p.is_greedy]
        self.is_all_greedy = not sampled
        self.need_top_k = any(_top_k_or_vocab(p, self.vocab_size) < self.vocab_size for p in sampled)
        self.need_top_p = any(p.top_p < 1.0 for p in sampled)
        self.need_min_p = any(p.min_p > 0.0 for p in sampled)
        self.need_custom = any(p.custom_logit_processor for p in self.params)


_ROW_TENSORS = ("temperatures", "top_ps", "top_ks", "min_ps", "seeds", "greedy", "logit_bias",
                "vocab_mask")


def _top_k_or_vocab(params: SamplingParams, vocab_size: int) -> int:
    return vocab_size if params.top_k < 0 else min(params.top_k, vocab_size)


def _filled(rows: int, like: torch.Tensor, value) -> torch.Tensor:
    return torch.full((rows,) + tuple(like.shape[1:]), value, dtype=like.dtype, device=like.device)


def _dense_logit_bias(params: Sequence[SamplingParams], vocab_size: int, device) -> Optional[torch.Tensor]:
    """[B, V] float32 additive bias, or None when no row has one. Keys are int after normalize."""
    if not any(p.logit_bias for p in params):
        return None
    rows, cols, values = [], [], []
    for row, p in enumerate(params):
        for token_id, bias in (p.logit_bias or {}).items():
            rows.append(row)
            cols.append(int(token_id))
            values.append(float(bias))
    bias = torch.zeros(len(params), vocab_size, dtype=torch.float32, device=device)
    bias[torch.tensor(rows, device=device), torch.tensor(cols, device=device)] = torch.tensor(
        values, dtype=torch.float32, device=device)
    return bias
