"""Request models of the OpenAI-compatible API (pydantic). Types are checked here; value ranges
are checked once, by SamplingParams.verify in the TokenizerManager, so both APIs agree.

Unknown fields are a 400 naming the field, except OpenAI fields that do not change the output
(``IGNORED_OPENAI_FIELDS``), which clients send routinely.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

IGNORED_OPENAI_FIELDS = ("user", "store", "metadata", "service_tier", "prompt_cache_key", "safety_identifier")
# SGLang's grammar extras (extra_body), each a SamplingParams field of the same name
STRUCTURED_OUTPUT_FIELDS = ("regex", "ebnf", "json_schema")

Stop = Union[str, list[str], None]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """response_format.json_schema: {"name", "description", "schema", "strict"}."""
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: Optional[str] = None
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(BaseModel):
    # extra="allow": a structural_tag format carries its own fields ("format")
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: Optional[JsonSchemaFormat] = None


class SamplingExtras(_Strict):
    """Fields both endpoints share: OpenAI's sampling fields plus SGLang's extra_body extras."""
    model: Optional[str] = None
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Stop = None
    seed: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    max_tokens: Optional[int] = None
    response_format: Optional[ResponseFormat] = None   # OpenAI's for chat; SGLang takes it for completions too
    # SGLang extras (extra_body)
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    min_tokens: Optional[int] = None
    skip_special_tokens: Optional[bool] = None
    spaces_between_special_tokens: Optional[bool] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: Optional[bool] = None
    no_stop_trim: Optional[bool] = None
    regex: Optional[str] = None
    ebnf: Optional[str] = None
    json_schema: Union[str, dict, None] = None
    rid: Optional[str] = None
    priority: Optional[int] = None
    # accepted and ignored (see module docstring)
    user: Optional[str] = None
    store: Optional[bool] = None
    metadata: Optional[dict[str, Any]] = None
    service_tier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    safety_identifier: Optional[str] = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: Optional[str] = None


class ChatMessage(BaseModel):
    # extra="allow": clients echo back fields of earlier responses (refusal, annotations, ...)
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_call_id: Optional[str] = None
    reasoning_content: Optional[str] = None


class ToolFunction(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(_Strict):
    type: Literal["function"] = "function"
    function: ToolFunction


class ToolChoiceFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"] = "function"
    function: ToolChoiceFunction


class ChatCompletionRequest(SamplingExtras):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    tools: Optional[list[Tool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: Optional[bool] = None   # False: a forced tool choice makes exactly one call
    reasoning_effort: Optional[str] = None       # -> a thinking budget (server/reasoning_budget.py)
    # SGLang extras
    continue_final_message: bool = False
    separate_reasoning: bool = True
    stream_reasoning: bool = True
    chat_template_kwargs: Optional[dict[str, Any]] = None


class CompletionRequest(SamplingExtras):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class EmbeddingRequest(_Strict):
    input: Union[str, list[str], list[int], list[list[int]]]
    model: Optional[str] = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = None
    user: Optional[str] = None


class RerankRequest(_Strict):
    query: str
    documents: list[str]
    model: Optional[str] = None
    top_n: Optional[int] = None
    return_documents: bool = True


class BatchCreateRequest(_Strict):
    input_file_id: str
    endpoint: Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
    completion_window: str = "24h"
    metadata: Optional[dict[str, Any]] = None
