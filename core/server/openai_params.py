"""OpenAI request fields -> the native request dict the TokenizerManager prepares.

Only types are checked here (pydantic did that); value ranges are SamplingParams.verify's job.
What the server cannot honour is refused with a 400 naming the field, never ignored.

Structured output: response_format, the extra_body fields regex / ebnf / json_schema and a forced
tool_choice each become one grammar field of SamplingParams (an ``OutputConstraint``); a request
may carry one of them. The grammar checker's 400 for a bad spec is renamed to the request field
the spec came from (e.g. response_format.json_schema.schema).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

from kvyard.errors import RequestError
from kvyard.server.protocol import STRUCTURED_OUTPUT_FIELDS, ChatCompletionRequest, ResponseFormat, SamplingExtras

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


JSON_OBJECT_SCHEMA = '{"type": "object"}'   # response_format json_object: any JSON object


@dataclass(frozen=True)
class OutputConstraint:
    kind: str     # the SamplingParams grammar field: json_schema | regex | ebnf | structural_tag
    spec: str     # its value (JSON text for json_schema and structural_tag)
    param: str    # the request field it came from, named in errors

    @property
    def field(self) -> str:
        """The top-level request field (what two constraints at once are named by)."""
        return self.param.split(".")[0]


def output_constraint(req: SamplingExtras, tool_call: Optional[tuple[str, str]] = None) -> Optional[OutputConstraint]:
    """The request's one grammar, or None. ``tool_call`` is tool_call_constraint's (kind, spec)
    for a forced tool_choice. Two or more constraints are a 400 naming them all."""
    found = [c for c in (response_format_constraint(req.response_format),) if c is not None]
    for name in STRUCTURED_OUTPUT_FIELDS:
        value = getattr(req, name)
        if value is not None:
            found.append(OutputConstraint(name, value if isinstance(value, str) else json.dumps(value), name))
    if tool_call is not None:
        found.append(OutputConstraint(*tool_call, param="tool_choice"))
    if len(found) > 1:
        names = ", ".join(c.field for c in found)
        raise RequestError(f"{found[-1].field}: only one output constraint may be given per request "
                           f"(response_format, regex, ebnf, json_schema or a forced tool_choice), got {names}",
                           param=found[-1].field)
    return found[0] if found else None


def response_format_constraint(fmt: Optional[ResponseFormat]) -> Optional[OutputConstraint]:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return OutputConstraint("json_schema", JSON_OBJECT_SCHEMA, "response_format")
    if fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise RequestError("response_format.json_schema: required when type is json_schema",
                               param="response_format.json_schema")
        schema = fmt.json_schema.schema_
        if schema is None:
            raise RequestError("response_format.json_schema.schema: required (the JSON schema of the output)",
                               param="response_format.json_schema.schema")
        return OutputConstraint("json_schema", json.dumps(schema), "response_format.json_schema.schema")
    # structural_tag: xgrammar's format, {"type": "structural_tag", "format": {...}}
    return OutputConstraint("structural_tag", json.dumps(fmt.model_dump(exclude_none=True, by_alias=True)),
                            "response_format")


def prepare_constrained(tm: Any, obj: dict, constraint: Optional[OutputConstraint]) -> list:
    """tm.prepare(obj); a grammar error is reported against the request field the grammar came from."""
    try:
        return tm.prepare(obj)
    except RequestError as exc:
        if constraint is None or exc.param != constraint.kind or constraint.param == constraint.kind:
            raise
        message = exc.message.removeprefix(f"{constraint.kind}: ")
        raise RequestError(f"{constraint.param}: {message}", param=constraint.param, status=exc.status) from None


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
                   logprob_start_len: int = -1, constraint: Optional[OutputConstraint] = None) -> dict:
    """The dict TokenizerManager.prepare takes. ``prompt`` is {"input_ids": ...} or {"text": ...};
    ``top_logprobs`` None = no logprobs."""
    params = sampling_params_of(req, max_new_tokens)
    if constraint is not None:
        params[constraint.kind] = constraint.spec
    obj = {**prompt, "sampling_params": params, "stream": req.stream}
    if top_logprobs is not None:
        obj.update(return_logprob=True, top_logprobs_num=top_logprobs, logprob_start_len=logprob_start_len)
    if req.rid is not None:
        obj["rid"] = req.rid
    if req.priority is not None:
        obj["priority"] = req.priority
    return obj
