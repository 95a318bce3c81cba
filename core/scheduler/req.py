"""Req: one request's state inside the scheduler process (CPU only).

KV bookkeeping invariants (between steps):
  - ``req_to_token[req_pool_idx, :kv_len]`` holds the slots of the first ``kv_len`` tokens of
    ``origin_input_ids + output_ids``.
  - slots ``[:len(prefix_indices)]`` belong to the prefix cache (locked through ``last_node``);
    the rest up to ``kv_len`` are owned by this request alone.
  - a finished or aborted request has ``req_pool_idx is None`` and owns no slot.

Hidden states (``return_hidden_states``): the final hidden state (the LM head's input) of every
token fed to the model, collected in position order: ``hidden_len`` positions so far, each once
(a re-prefill after retraction skips those it has). ``hidden_states`` is SGLang's shape: the
prompt's rows as one entry [prompt_len][H] (added when the prompt is complete), then one [H]
per output token fed back (the last output token is never fed, so completion_tokens entries).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch


@dataclass
class FinishReason:
    type: str                 # "stop" | "length" | "abort"
    matched: Any = None       # the stop token id or stop string that ended it
    message: Optional[str] = None

    def to_dict(self) -> dict:
        d = {"type": self.type, "matched": self.matched}
        if self.message:
            d["message"] = self.message
        return d


@dataclass
class Req:
    rid: str
    origin_input_ids: list[int]
    sampling_params: Any                      # kvyard.sampling.params.SamplingParams
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1
    stream: bool = False
    priority: int = 0
    arrival: float = 0.0

    output_ids: list[int] = field(default_factory=list)
    finished_reason: Optional[FinishReason] = None

    # KV state (see module docstring)
    req_pool_idx: Optional[int] = None
    kv_len: int = 0                                   # tokens whose k/v are in the pool
    prefix_indices: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    last_node: Any = None                             # radix node locked for this request
    cached_tokens: int = 0                            # prompt tokens served from the prefix cache
    extend_len: int = 0                               # new tokens scheduled for this step
    is_chunked: bool = False                          # prefill not finished yet
    retractions: int = 0
    sent_len: int = 0                                 # output tokens already sent to the API process
    input_logprobs_sent: bool = False
    embed: bool = False
    spec_verify_ct: int = 0                           # speculative verify steps this request took part in
    spec_accepted_tokens: int = 0                     # draft tokens of its that the target accepted
    token_type_ids: Optional[list[int]] = None        # segment of each prompt token (encoder pairs)
    return_hidden_states: bool = False
    hidden_len: int = 0                               # positions whose hidden state was collected
    hidden_prompt: list = field(default_factory=list)   # prompt rows collected so far
    hidden_states: list = field(default_factory=list)   # entries (see module docstring)
    hidden_sent: int = 0                              # entries already sent to the API process
    # LoRA serving (kvyard.lora): the adapter, its pinned slot while admitted (-1: base model),
    # and the prefix-cache namespace of its KV (the adapter's load id; None: the base model)
    lora_name: Optional[str] = None
    lora_slot: Optional[int] = None
    cache_namespace: Optional[int] = None

    # sampling state carried across steps
    sampling_seed: int = 0                            # user seed or one drawn by the API process
    grammar: Any = None
    thinking: Any = None                              # kvyard.scheduler.thinking_budget.ThinkingState

    # logprobs accumulated for the output
    input_token_logprobs: list = field(default_factory=list)
    input_top_logprobs: list = field(default_factory=list)
    output_token_logprobs: list = field(default_factory=list)
    output_top_logprobs: list = field(default_factory=list)

    @property
    def all_ids(self) -> list[int]:
        return self.origin_input_ids + self.output_ids

    @property
    def seq_len(self) -> int:
        return len(self.origin_input_ids) + len(self.output_ids)

    def finished(self) -> bool:
        return self.finished_reason is not None

    def add_hidden_state(self, row: list[float]) -> None:
        """The hidden state [H] of position ``hidden_len`` (see the module docstring)."""
        prompt_len = len(self.origin_input_ids)
        if self.hidden_len < prompt_len:
            self.hidden_prompt.append(row)
            if len(self.hidden_prompt) == prompt_len:
                self.hidden_states.append(self.hidden_prompt)
        else:
            self.hidden_states.append(row)
        self.hidden_len += 1
