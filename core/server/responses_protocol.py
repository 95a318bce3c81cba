"""Request model of POST /v1/responses (OpenAI Responses API), pydantic.

Input items are kept as dicts here: their ``type`` decides their shape, and responses_input
checks each one and names the offending field (``input.2.call_id``). Unknown top-level fields are
a 400 naming the field, except the ones that do not change the output (IGNORED).
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

IGNORED = ("user", "metadata", "service_tier", "prompt_cache_key", "safety_identifier", "truncation",
           "include", "background", "max_tool_calls", "stream_options", "prompt_cache_retention")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str                                   # only "function" is served (checked in responses_input)
    name: Optional[str] = None
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class NamedFunction(_Strict):
    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: Optional[str] = None
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="allow")    # verbosity and later knobs do not change our output
    format: Optional[TextFormat] = None


class ReasoningConfig(BaseModel):
    model_config = ConfigDict(extra="allow")
    effort: Optional[str] = None
    summary: Optional[str] = None               # summaries are not produced: the full reasoning is


class ResponsesRequest(_Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [{"input": "Hi", "max_output_tokens": 4}]})
    model: Optional[str] = None
    input: Union[str, list[dict[str, Any]]]
    instructions: Optional[str] = None
    tools: Optional[list[FunctionTool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedFunction, None] = None
    parallel_tool_calls: Optional[bool] = None
    text: Optional[TextConfig] = None
    reasoning: Optional[ReasoningConfig] = None
    max_output_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    stream: bool = False
    store: bool = True
    previous_response_id: Optional[str] = None
    # SGLang-style extras
    top_k: Optional[int] = None
    seed: Optional[int] = None
    # accepted and ignored (see IGNORED)
    user: Optional[str] = None
    metadata: Optional[dict[str, Any]] = None
    service_tier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    prompt_cache_retention: Optional[str] = None
    safety_identifier: Optional[str] = None
    truncation: Optional[str] = None
    include: Optional[list[str]] = None
    background: Optional[bool] = None
    max_tool_calls: Optional[int] = None
    stream_options: Optional[dict[str, Any]] = None
