"""Sampling one step's logits: what it needs (SamplingSpec, snapshotted from the requests when
the batch is prepared), the device tensors it yields, and their host form (StepResult).

Shared by ModelRunner.forward (sample right after the forward) and the overlap worker (sample
on its thread, copy to the host later), so both produce the same StepResult. Logits rows: the S
sample rows, then the P prompt-logprob rows (ModelRunner.prepare's logits_indices order).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from kvyard.sampling.sampler import logprobs_of, top_logprobs
from kvyard.scheduler.schedule_batch import ScheduleBatch, StepResult


@dataclass
class SamplingSpec:
    sampling_info: object                # the batch's SamplingBatchInfo
    positions: torch.Tensor              # [S] int64 sequence length at each sample row (seeds)
    want_logprob: bool
    top_logprobs_nums: list[int]         # [S]
    input_targets: Optional[torch.Tensor] = None  # [P] prompt-logprob targets, None without
    input_top_k: int = 0

    @property
    def num_samples(self) -> int:
        return len(self.top_logprobs_nums)


def sampling_spec(batch: ScheduleBatch, positions: list[int], device) -> SamplingSpec:
    """The spec of ``batch``; positions [S]: the sequence length of each sample row's request."""
    sampled = [batch.reqs[i] for i in batch.sample_req_idx]
    spec = SamplingSpec(
        sampling_info=batch.sampling_info,
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        want_logprob=any(r.return_logprob for r in sampled),
        top_logprobs_nums=[r.top_logprobs_num if r.return_logprob else 0 for r in sampled])
    if batch.input_logprob_rows:
        spec.input_targets = torch.tensor([t for _, _, t in batch.input_logprob_rows],
                                          dtype=torch.int64, device=device)
        spec.input_top_k = max(batch.reqs[i].top_logprobs_num for i, _, _ in batch.input_logprob_rows)
    return spec


def sample_outputs(sampler, spec: SamplingSpec, logits: torch.Tensor,
                   hidden: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """Device tensors of one step: next_ids [S] (+ logprobs [S], top values/ids [S, K], prompt
    logprobs [P] and their top values/ids [P, K'] where asked; the hidden states [K, H] of the
    step's hidden rows when it has them)."""
    s = spec.num_samples
    out: dict[str, torch.Tensor] = {}
    if s:
        sampled = sampler(logits[:s], spec.sampling_info, spec.positions, spec.want_logprob,
                          spec.top_logprobs_nums)
        out["next_ids"] = sampled.next_ids
        if sampled.logprobs is not None:
            out["logprobs"] = sampled.logprobs
        if sampled.top_logprobs is not None:
            out["top_values"], out["top_ids"] = sampled.top_logprobs
    else:
        out["next_ids"] = torch.empty(0, dtype=torch.int64, device=logits.device)
    if spec.input_targets is not None:
        prompt_rows = logits[s:]
        out["input_logprobs"] = logprobs_of(prompt_rows, spec.input_targets)
        if spec.input_top_k > 0:
            out["input_top_values"], out["input_top_ids"] = top_logprobs(prompt_rows, spec.input_top_k)
    if hidden is not None:
        out["hidden_states"] = hidden
    return out


def to_step_result(outputs: dict[str, torch.Tensor], top_nums: list[int]) -> StepResult:
    """``sample_outputs``' tensors -> the StepResult ``Scheduler._process`` takes (their
    ``tolist`` is the step's host sync)."""
    lists = {name: t.tolist() for name, t in outputs.items()}
    result = StepResult(next_ids=lists["next_ids"], logprobs=lists.get("logprobs"),
                        input_logprobs=lists.get("input_logprobs"), hidden_states=lists.get("hidden_states"))
    if "top_values" in lists:
        result.top_logprobs = [list(zip(v[:k], i[:k]))
                               for v, i, k in zip(lists["top_values"], lists["top_ids"], top_nums)]
    if "input_top_values" in lists:
        result.input_top_logprobs = [list(zip(v, i)) for v, i in
                                     zip(lists["input_top_values"], lists["input_top_ids"])]
    return result
