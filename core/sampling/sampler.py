"""The batched sampler: logits [B, V] -> next token ids [B], all on the device, no host sync.

Order of operations for each row:
  1. custom logit processors (requests that selected one), logit_bias (additive), penalties (repetition, then frequency/presence, then min_new_tokens
     blocking), grammar vocab_mask (-inf where disallowed);
  2. greedy rows (top_k == 1) take the argmax of those processed logits;
  3. other rows: softmax(logits / temperature) -> top-k -> top-p (over the top-k renormalized
     mass, as HF/vLLM) -> min-p (relative to the row's top probability) -> draw.

The draw is an exponential race, argmax(prob / E) with E ~ Exp(1), which picks token t with
probability prob[t]. E comes from a counter-based hash of (seed, position, token id), so a row's
token depends only on its own logits, seed and position: never on the other rows of the batch,
their order, or any generator state.

Logprobs are those of the raw model distribution: log_softmax of the logits as given, before
bias, penalties, grammar mask and temperature (SGLang reports the processed distribution; the raw
one is what the model believes and does not change with sampling settings).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from kvyard.sampling.batch_info import SamplingBatchInfo
from kvyard.sampling.custom_logits import apply_logit_processors


@dataclass
class SampleOutput:
    next_ids: torch.Tensor                                   # [B] int64
    logprobs: Optional[torch.Tensor] = None                  # [B] float32 of next_ids
    top_logprobs: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # values [B, K], ids [B, K]


class Sampler:
    def __call__(self, logits: torch.Tensor, info: SamplingBatchInfo, positions: torch.Tensor,
                 return_logprob: bool = False, top_logprobs_nums: Sequence[int] = ()) -> SampleOutput:
        """logits [B, V]; positions [B] int64 (sequence length / step, seeds the draw);
        top_logprobs_nums [B]: the batch returns K = max of them top logprobs per row."""
        logits = logits.float()
        processed = process_logits(logits, info)
        if info.is_all_greedy:
            next_ids = processed.argmax(dim=-1)
        else:
            next_ids = _sample(processed, info, positions)
        out = SampleOutput(next_ids=next_ids)
        if return_logprob:
            raw_logprobs = torch.log_softmax(logits, dim=-1)
            out.logprobs = raw_logprobs.gather(1, next_ids.view(-1, 1)).squeeze(1)
            k = min(max(top_logprobs_nums, default=0), logits.shape[-1])
            if k > 0:
                out.top_logprobs = tuple(raw_logprobs.topk(k, dim=-1))
        return out


def process_logits(logits: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
    """logits [B, V] float32 -> custom-processed, biased, penalized, masked logits (a new
    tensor when changed)."""
    if info.need_custom:
        logits = apply_logit_processors(logits, info.params)
    if info.logit_bias is not None:
        logits = logits + info.logit_bias
    logits = info.penalties.apply(logits)
    if info.vocab_mask is not None:
        logits = logits.masked_fill(~info.vocab_mask, float("-inf"))
    return logits


def _sample(logits: torch.Tensor, info: SamplingBatchInfo, positions: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax(logits / info.temperatures, dim=-1)
    probs = filter_probs(probs, info)
    noise = exponential_noise(info.seeds, positions, logits.shape[-1])
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(info.greedy, logits.argmax(dim=-1), sampled)


def filter_probs(probs: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
    """Zero the probabilities top-k / top-p / min-p exclude. probs [B, V], not renormalized
    (the exponential race does not need it). Each filter runs only when some row asked for it."""
    if info.need_top_k or info.need_top_p:
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
        if info.need_top_k:
            rank = torch.arange(probs.shape[-1], device=probs.device)
            sorted_probs = sorted_probs.masked_fill(rank >= info.top_ks.unsqueeze(1), 0.0)
        if info.need_top_p:
            sorted_probs = _top_p_sorted(sorted_probs, info.top_ps)
        probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
    if info.need_min_p:
        threshold = info.min_ps.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs


def _top_p_sorted(sorted_probs: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    """Keep the smallest prefix whose mass reaches top_p of the (top-k kept) total."""
    cumulative = sorted_probs.cumsum(dim=-1)
    mass_before = cumulative - sorted_probs                     # mass of strictly better tokens
    total = cumulative[:, -1:]
    drop = (mass_before >= top_ps.unsqueeze(1) * total) & (top_ps < 1.0).unsqueeze(1)
    return sorted_probs.masked_fill(drop, 0.0)


# -- counter-based noise -----------------------------------------------------------------------
def _as_int64(value: int) -> int:
    """A 64-bit constant as the signed int64 with the same bits."""
    return value - (1 << 64) if value >= (1 << 63) else value


_GOLDEN = _as_int64(0x9E3779B97F4A7C15)
_MIX1 = _as_int64(0xBF58476D1CE4E5B9)
_MIX2 = _as_int64(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic on negative values)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finalizer on int64 tensors; multiplication wraps modulo 2**64."""
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] float32 in (0, 1), a pure function of (seed[b], position[b], token id)."""
    row_key = _mix64(_mix64(seeds ^ _GOLDEN) + positions.to(torch.int64) * _GOLDEN)   # [B]
    tokens = torch.arange(vocab_size, dtype=torch.int64, device=seeds.device) * _GOLDEN
    bits = _shift_right(_mix64(row_key.unsqueeze(1) + tokens), 40)                   # 24 bits
    return (bits.to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def exponential_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] float32 Exp(1) draws, strictly positive and finite."""
    # The largest uniform draw, 1 - 2**-25, rounds to 1.0 in float32 and log(1.0) = 0; a zero
    # draw would turn a filtered token's 0 / 0 into NaN, which argmax picks. 2**-25 is the
    # draw's true value, and every other draw is larger, so the clamp changes nothing else.
    return (-torch.log(uniform_noise(seeds, positions, vocab_size))).clamp_min(2.0 ** -25)


# -- logprob helpers (also used for prompt logprobs) -------------------------------------------
def logprobs_of(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """logits [N, V], token_ids [N] -> [N] float32 log p(token) under the raw distribution."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return logprobs.gather(1, token_ids.view(-1, 1).to(torch.int64)).squeeze(1)


def top_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, V] -> (values [N, k] float32 descending, ids [N, k] int64)."""
    k = min(k, logits.shape[-1])
    return torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)
