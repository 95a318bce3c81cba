"""Request models of the OpenAI-compatible API (pydantic). Types are checked here; value ranges
are checked once, by SamplingParams.verify in the TokenizerManager, so both APIs agree.

Unknown fields are a 400 naming the field, except OpenAI fields that do not change the output
(``IGNORED_OPENAI_FIELDS``), which clients send routinely.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, Strict, create_model

IGNORED_OPENAI_FIELDS = ("user", "store", "metadata", "service_tier", "prompt_cache_key", "safety_identifier")
# SGLang's grammar extras (extra_body), each a SamplingParams field of the same name
STRUCTURED_OUTPUT_FIELDS = ("regex", "ebnf", "json_schema")

Stop = Union[str, list[str], None]
Bool = Annotated[bool, Strict()]   # true/false only: "yes", 1 or "true" are refused, not coerced
# every model refuses NaN and infinities (JSON has neither; 1e400 parses as inf)
_FINITE = dict(allow_inf_nan=False)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", **_FINITE)


class StreamOptions(_Strict):
    include_usage: Bool = False


class JsonSchemaFormat(BaseModel):
    """response_format.json_schema: {"name", "description", "schema", "strict"}."""
    model_config = ConfigDict(extra="allow", populate_by_name=True, **_FINITE)
    name: Optional[str] = None
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[Bool] = None


class ResponseFormat(BaseModel):
    # extra="allow": a structural_tag format carries its own fields ("format")
    model_config = ConfigDict(extra="allow", **_FINITE)
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: Optional[JsonSchemaFormat] = None


class SamplingExtras(_Strict):
    """Fields both endpoints share: OpenAI's sampling fields plus SGLang's extra_body extras."""
    model: Optional[str] = None
    n: int = 1
    stream: Bool = False
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
    skip_special_tokens: Optional[Bool] = None
    spaces_between_special_tokens: Optional[Bool] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: Optional[Bool] = None
    no_stop_trim: Optional[Bool] = None
    regex: Optional[str] = None
    ebnf: Optional[str] = None
    json_schema: Union[str, dict, None] = None
    rid: Optional[str] = None
    priority: Optional[int] = None
    # accepted and ignored (see module docstring)
    user: Optional[str] = None
    store: Optional[Bool] = None
    metadata: Optional[dict[str, Any]] = None
    service_tier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    safety_identifier: Optional[str] = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", **_FINITE)
    type: str
    text: Optional[str] = None


class ChatMessage(BaseModel):
    # extra="allow": clients echo back fields of earlier responses (refusal, annotations, ...)
    model_config = ConfigDict(extra="allow", **_FINITE)
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_call_id: Optional[str] = None
    reasoning_content: Optional[str] = None


class ToolFunction(BaseModel):
    model_config = ConfigDict(extra="allow", **_FINITE)
    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[Bool] = None


class Tool(_Strict):
    type: Literal["function"] = "function"
    function: ToolFunction


class ToolChoiceFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"] = "function"
    function: ToolChoiceFunction


class ChatCompletionRequest(SamplingExtras):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}]})
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: Bool = False
    top_logprobs: Optional[int] = None
    tools: Optional[list[Tool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: Optional[Bool] = None   # False: a forced tool choice makes exactly one call
    reasoning_effort: Optional[str] = None       # -> a thinking budget (server/reasoning_budget.py)
    # SGLang extras
    continue_final_message: Bool = False
    separate_reasoning: Bool = True
    stream_reasoning: Bool = True
    chat_template_kwargs: Optional[dict[str, Any]] = None


class CompletionRequest(SamplingExtras):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"prompt": "The capital of France is", "max_tokens": 4, "logprobs": 2}]})
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: Bool = False
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class EmbeddingRequest(_Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [{"input": ["The cat sits on the mat."]}]})
    input: Union[str, list[str], list[int], list[list[int]]]
    model: Optional[str] = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = None
    user: Optional[str] = None


class RerankRequest(_Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"query": "what is a panda?", "documents": ["hi", "The giant panda is a bear."]}]})
    query: str
    documents: list[str]
    model: Optional[str] = None
    top_n: Optional[int] = None
    return_documents: bool = True


class BatchCreateRequest(_Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"input_file_id": "file-0123456789abcdef0123456789abcdef", "endpoint": "/v1/chat/completions"}]})
    input_file_id: str
    endpoint: Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
    completion_window: str = "24h"
    metadata: Optional[dict[str, Any]] = None


# -- native (SGLang-style) routes ------------------------------------------------------------
def _sampling_params_model() -> type[BaseModel]:
    """The JSON shape of SamplingParams, field for field (so a field added there is accepted
    here too): every field optional, types strict (no "5" for 5, no "yes" for true)."""
    from kvyard.sampling.params import _DERIVED, SamplingParams

    hints = get_type_hints(SamplingParams)
    fields = {name: (Optional[hint], None) for name, hint in hints.items() if name not in _DERIVED}
    config = ConfigDict(extra="forbid", strict=True, **_FINITE)
    return create_model("SamplingParamsBody", __config__=config, **fields)


SamplingParamsBody = _sampling_params_model()


class _Native(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, **_FINITE)


class GenerateRequest(BaseModel):
    """POST /generate. Unknown fields pass through to the TokenizerManager, which names them."""
    model_config = ConfigDict(extra="allow", strict=True, **_FINITE, json_schema_extra={"examples": [
        {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 4}, "return_logprob": True,
         "top_logprobs_num": 2, "return_text_in_logprobs": True}]})
    text: Union[str, list[str], None] = None
    prompt: Union[str, list[str], None] = None           # an alias of text
    input_ids: Union[list[int], list[list[int]], None] = None
    sampling_params: Union[SamplingParamsBody, list[SamplingParamsBody], None] = None
    rid: Union[str, list[str], None] = None               # a list: one per prompt
    return_logprob: Optional[Bool] = None
    top_logprobs_num: Optional[int] = Field(default=None, ge=0)
    logprob_start_len: Optional[int] = None
    return_text_in_logprobs: Optional[Bool] = None
    stream: Optional[Bool] = None
    priority: Optional[int] = None
    return_hidden_states: Optional[Bool] = None    # needs --enable-return-hidden-states
    lora_path: Union[str, list[Optional[str]], None] = None   # LoRA adapter name(s): one, or one per prompt


class EncodeRequest(BaseModel):
    """POST /encode and /classify (text pairs for cross-encoders). Other fields pass through to
    the TokenizerManager, which accepts SGLang's EmbeddingReqInput fields and names the rest."""
    model_config = ConfigDict(extra="allow", strict=True, **_FINITE,
                              json_schema_extra={"examples": [{"text": "Paris is in France."}]})
    text: Union[str, list[str], list[list[str]], None] = None
    input_ids: Union[list[int], list[list[int]], None] = None
    rid: Union[str, list[str], None] = None


class AbortRequest(_Native):
    model_config = ConfigDict(json_schema_extra={"examples": [{"rid": "my-request-id"}]})
    rid: str = ""
    abort_all: Bool = False


class UpdateWeightsRequest(_Native):
    model_config = ConfigDict(json_schema_extra={"examples": [{"model_path": "/path/to/new/checkpoint"}]})
    model_path: str = Field(min_length=1)
    load_format: Optional[str] = None
    weight_version: Optional[str] = None    # the new --weight-version once loaded


class FunctionCallRequest(_Native):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"text": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
         "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
         "tool_call_parser": "qwen25"}]})
    text: str
    tools: list[Tool]
    tool_call_parser: Optional[str] = None


class SeparateReasoningRequest(_Native):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"text": "<think>2+2 is 4</think>The answer is 4.", "reasoning_parser": "deepseek-r1"}]})
    text: str
    reasoning_parser: Optional[str] = None


# -- responses -------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: int


class ErrorResponse(BaseModel):
    """The body of every error: {"error": {"message", "type", "param", "code"}}."""
    error: ErrorDetail


class AdminResult(BaseModel):
    """/update_weights_from_disk and /flush_cache answer this, on success (200) and failure (400)."""
    success: bool
    message: str
