"""OpenAI request fields -> the native request dict the TokenizerManager prepares.

Only types are checked here (pydantic did that); value ranges are SamplingParams.verify's job.
What the server cannot honour yet is refused with a 400 naming the field, never ignored.
"""
from __future__ import annotations

from typing import Optional

from kvyard.errors import RequestError
from kvyard.server.protocol import STRUCTURED_OUTPUT_FIELDS, ChatCompletionRequest, SamplingExtras

MAX_TOP_LOGPROBS = 20
# OpenAI name -> SamplingParams name, for fields copied as they are
_DIRECT = {"stop": "stop", "n": "n", "seed": "seed", "temperature": "temperature", "top_p": "top_p",
           "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
           "logit_bias": "logit_bias", "top_k": "top_k", "min_p": "min_p",
           "repetition_penalty": "repetition_penalty", "min_tokens": "min_new_tokens",
           "skip_special_tokens": "skip_special_tokens",
           "spaces_between_special_tokens": "spaces_between_special_tokens",
           "stop_token_ids": "stop_token_ids", "ignore_eos": "ignore_eos", "no_stop_trim": "no_stop_trim"}


def sampling_params_of(req: SamplingExtras, max_new_tokens: int) -> dict:
    params = {"max_new_tokens": max_new_tokens}
    for src, dst in _DIRECT.items():
        value = getattr(req, src)
        if value is not None:
            params[dst] = value
    return params


def reject_structured_output(req: SamplingExtras) -> None:
    for name in STRUCTURED_OUTPUT_FIELDS:
        if getattr(req, name) is not None:
            raise RequestError(f"{name}: structured output is not supported yet", param=name)
    fmt = getattr(req, "response_format", None)
    if fmt is not None and fmt.type != "text":
        raise RequestError(f"response_format: structured output ({fmt.type}) is not supported yet",
                           param="response_format")


def check_top_logprobs(value: Optional[int], name: str) -> int:
    if value is None:
        return 0
    if not 0 <= value <= MAX_TOP_LOGPROBS:
        raise RequestError(f"{name} must be in [0, {MAX_TOP_LOGPROBS}], got {value}", param=name)
    return value


def chat_max_tokens(req: ChatCompletionRequest, context_length: int) -> int:
    """max_completion_tokens, else max_tokens, else as many as the context allows (the
    TokenizerManager caps any value at the room the prompt leaves)."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = getattr(req, name)
        if value is not None:
            if value < 1:
                raise RequestError(f"{name} must be >= 1, got {value}", param=name)
            return value
    return context_length


def native_request(req: SamplingExtras, prompt: dict, max_new_tokens: int, top_logprobs: Optional[int],
                   logprob_start_len: int = -1) -> dict:
    """The dict TokenizerManager.prepare takes. ``prompt`` is {"input_ids": ...} or {"text": ...};
    ``top_logprobs`` None = no logprobs."""
    obj = {**prompt, "sampling_params": sampling_params_of(req, max_new_tokens), "stream": req.stream}
    if top_logprobs is not None:
        obj.update(return_logprob=True, top_logprobs_num=top_logprobs, logprob_start_len=logprob_start_len)
    if req.rid is not None:
        obj["rid"] = req.rid
    if req.priority is not None:
        obj["priority"] = req.priority
    return obj
