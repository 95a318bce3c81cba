"""Messages between the TokenizerManager (API process) and the Scheduler process.

All are small picklable dataclasses sent over ZMQ. Direction:
  API -> scheduler: TokenizedGenerateReq, AbortReq, ControlReq
  scheduler -> API: BatchTokenOut, ControlReply, SchedulerError
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class TokenizedGenerateReq:
    rid: str
    input_ids: list[int]
    sampling_params: Any          # normalized kvyard.sampling.params.SamplingParams
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1
    stream: bool = False
    priority: int = 0
    sampling_seed: int = 0        # the user's seed, or one drawn by the API process
    embed: bool = False           # embedding request: run the prompt, return the pooled vector
    token_type_ids: Optional[list[int]] = None   # per prompt token (cross-encoder pairs), or None
    return_hidden_states: bool = False   # send the final hidden state of every token fed (Req.hidden_states)
    lora_name: Optional[str] = None               # LoRA adapter (kvyard.lora); None: the base model


@dataclass
class AbortReq:
    rid: str                      # "" aborts every request


@dataclass
class ControlReq:
    id: int
    op: str                       # flush_cache | get_info | update_weights | check_integrity | load_lora | unload_lora
    args: dict = field(default_factory=dict)


@dataclass
class ReqUpdate:
    """New output of one request since its previous update."""
    rid: str
    new_token_ids: list[int]
    finished_reason: Optional[dict]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    # logprobs of the new tokens: list of (logprob, token_id); top: list of list of (logprob, id)
    output_token_logprobs: list = field(default_factory=list)
    output_top_logprobs: list = field(default_factory=list)
    # prompt logprobs, sent once with the first update
    input_token_logprobs: list = field(default_factory=list)
    input_top_logprobs: list = field(default_factory=list)
    embedding: Optional[list[float]] = None
    spec_verify_ct: int = 0              # speculative verify steps so far (0: no speculation)
    spec_accepted_tokens: int = 0        # draft tokens accepted so far
    # new entries of SGLang's meta_info["hidden_states"] (Req.hidden_states): the prompt's rows
    # as one entry [prompt_len][H], then one [H] per output token fed back
    hidden_states: list = field(default_factory=list)


@dataclass
class BatchTokenOut:
    updates: list[ReqUpdate]


@dataclass
class ControlReply:
    id: int
    ok: bool
    result: Any = None
    message: str = ""


@dataclass
class SchedulerError:
    """The scheduler hit an unrecoverable error; the API process fails pending requests."""
    message: str
