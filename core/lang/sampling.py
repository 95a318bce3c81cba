"""Sampling parameters of one gen/select call, merged from the run's defaults and the call's
own arguments (a None field means "not set here": the run's default applies)."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional, Union

# field name -> name in the native /generate sampling_params
NATIVE_NAMES = {"max_new_tokens": "max_new_tokens", "min_new_tokens": "min_new_tokens", "stop": "stop",
                "stop_token_ids": "stop_token_ids", "temperature": "temperature", "top_p": "top_p",
                "top_k": "top_k", "min_p": "min_p", "frequency_penalty": "frequency_penalty",
                "presence_penalty": "presence_penalty", "ignore_eos": "ignore_eos", "regex": "regex",
                "json_schema": "json_schema", "n": "n"}
LOGPROB_FIELDS = ("return_logprob", "logprob_start_len", "top_logprobs_num", "return_text_in_logprobs")


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: Optional[int] = None
    min_new_tokens: Optional[int] = None
    n: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: Optional[list[int]] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    ignore_eos: Optional[bool] = None
    regex: Optional[str] = None
    json_schema: Optional[str] = None
    return_logprob: Optional[bool] = None
    logprob_start_len: Optional[int] = None
    top_logprobs_num: Optional[int] = None
    return_text_in_logprobs: Optional[bool] = None

    def over(self, defaults: "SamplingParams") -> "SamplingParams":
        """These parameters where set, ``defaults`` elsewhere."""
        changes = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        return replace(defaults, **changes)

    def native(self) -> dict:
        """The set fields as /generate's sampling_params."""
        out = {NATIVE_NAMES[k]: v for k, v in self._set().items() if k in NATIVE_NAMES}
        if isinstance(out.get("stop"), str):
            out["stop"] = [out["stop"]]
        return out

    def logprob_request(self) -> dict:
        """The request-level logprob fields that are set."""
        return {k: v for k, v in self._set().items() if k in LOGPROB_FIELDS}

    def _set(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


DEFAULT_RUN_PARAMS = SamplingParams(max_new_tokens=128, temperature=1.0)
