"""Response models of every JSON route (pydantic), for /openapi.json only: the handlers build
plain dicts (core/server/openai_*.py, native_api.py, ...) and these models say what those dicts
are, so a schema-driven client or a fuzzer can check every answer.

Invariants:
- a field the server always sends is required (nullable when it may be null); a field sent only
  in some cases (logprobs asked for, a reasoning parser, speculative decoding) is optional;
- every object allows extra keys (``_Out``): a new key is not a breaking change, a missing or
  mistyped documented one is (tests/integration/test_openapi_fuzz.py checks real answers);
- streams (text/event-stream) and the text/plain answers are documented in openapi.py.
"""
from __future__ import annotations

from typing import Any, Generic, Literal, Optional, TypeVar, Union

from pydantic import BaseModel, ConfigDict, RootModel

T = TypeVar("T")


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


class ListOf(_Out, Generic[T]):
    """The OpenAI list envelope, {"object": "list", "data": [T, ...]}; each list subclasses it
    (its schema keeps the subclass's name) and adds its own fields."""
    object: Literal["list"]
    data: list[T]


def ok(model: Any, description: str = "success") -> dict:
    """The ``responses=`` entry of a route whose 200 body is ``model``."""
    return {200: {"model": model, "description": description}}


# -- shared ----------------------------------------------------------------------------------
class FinishReason(_Out):
    """Why a sequence ended: {"type": "stop" | "length" | "abort", "matched"?: stop string or id}."""
    type: str


# (logprob, token id, token text or null); the first prompt token's logprob is null
LogprobTriple = tuple[Optional[float], int, Optional[str]]


class PromptTokensDetails(_Out):
    cached_tokens: int


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: Optional[PromptTokensDetails] = None


# -- /v1/models ------------------------------------------------------------------------------
class ModelCard(_Out):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(ListOf[ModelCard]):
    pass


# -- /v1/chat/completions --------------------------------------------------------------------
class ToolCallFunction(_Out):
    name: str
    arguments: str            # JSON text


class ToolCall(_Out):
    id: str
    type: Literal["function"]
    function: ToolCallFunction


class AssistantMessage(_Out):
    role: Literal["assistant"]
    content: Optional[str]
    reasoning_content: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Out):
    content: list[TokenLogprob]


class ChatChoice(_Out):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs]
    finish_reason: Optional[str]
    matched_stop: Union[str, int, None] = None


class ChatCompletion(_Out):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


# -- /v1/completions -------------------------------------------------------------------------
class CompletionLogprobs(_Out):
    tokens: list[Optional[str]]
    token_logprobs: list[Optional[float]]
    top_logprobs: Optional[list[Optional[dict[str, float]]]]
    text_offset: list[int]


class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs]
    finish_reason: Optional[str]
    matched_stop: Union[str, int, None] = None


class Completion(_Out):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


# -- /v1/embeddings --------------------------------------------------------------------------
class Embedding(_Out):
    object: Literal["embedding"]
    index: int
    embedding: Union[list[float], str]     # str: base64 of little-endian float32


class EmbeddingUsage(_Out):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(ListOf[Embedding]):
    model: str
    usage: EmbeddingUsage


# -- /v1/files, /v1/batches ------------------------------------------------------------------
class FileObject(_Out):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Optional[str] = None


class FileList(ListOf[FileObject]):
    pass


class Deleted(_Out):
    id: str
    object: str
    deleted: bool


class BatchRequestCounts(_Out):
    total: int
    completed: int
    failed: int


class BatchError(_Out):
    code: Optional[str]
    message: str
    param: Optional[str] = None
    line: Optional[int] = None


class BatchErrors(ListOf[BatchError]):
    pass


class Batch(_Out):
    id: str
    object: Literal["batch"]
    endpoint: str
    errors: Optional[BatchErrors]
    input_file_id: str
    completion_window: str
    status: Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired",
                    "cancelling", "cancelled"]
    output_file_id: Optional[str]
    error_file_id: Optional[str]
    created_at: int
    request_counts: BatchRequestCounts
    metadata: Optional[dict[str, Any]] = None


class BatchList(ListOf[Batch]):
    first_id: Optional[str]
    last_id: Optional[str]
    has_more: bool


# -- /v1/responses ---------------------------------------------------------------------------
class ResponseUsage(_Out):
    input_tokens: int
    input_tokens_details: dict[str, int]
    output_tokens: int
    output_tokens_details: dict[str, int]
    total_tokens: int


class OutputItem(_Out):
    """A ``reasoning``, ``message`` or ``function_call`` item."""
    id: str
    type: Literal["reasoning", "message", "function_call"]
    status: str


class ResponseObject(_Out):
    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    error: Optional[dict[str, Any]]
    incomplete_details: Optional[dict[str, Any]]
    model: str
    output: list[OutputItem]
    usage: Optional[ResponseUsage]


# -- /v1/messages (Anthropic) ----------------------------------------------------------------
class ContentBlock(_Out):
    """A ``thinking``, ``text`` or ``tool_use`` block."""
    type: Literal["thinking", "text", "tool_use"]


class MessageUsage(_Out):
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int
    cache_creation_input_tokens: int


class MessageResponse(_Out):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[ContentBlock]
    stop_reason: Optional[Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]]
    stop_sequence: Optional[str]
    usage: MessageUsage


class TokenCount(_Out):
    input_tokens: int


# -- native routes ---------------------------------------------------------------------------
class MetaInfo(_Out):
    id: str
    prompt_tokens: int
    finish_reason: Optional[FinishReason]
    completion_tokens: Optional[int] = None
    cached_tokens: Optional[int] = None
    e2e_latency: Optional[float] = None
    ttft: Optional[float] = None
    output_token_logprobs: Optional[list[LogprobTriple]] = None
    output_top_logprobs: Optional[list[Optional[list[LogprobTriple]]]] = None
    input_token_logprobs: Optional[list[LogprobTriple]] = None
    input_top_logprobs: Optional[list[Optional[list[LogprobTriple]]]] = None


class GenerateOutput(_Out):
    text: str
    output_ids: list[int]
    meta_info: MetaInfo


class GenerateResponse(RootModel[Union[GenerateOutput, list[GenerateOutput]]]):
    """One output, or a list for a list of prompts (or n > 1)."""


class EncodeOutput(_Out):
    embedding: list[float]
    meta_info: MetaInfo


class EncodeResponse(RootModel[Union[EncodeOutput, list[EncodeOutput]]]):
    """One output, or a list for a list of inputs."""


class RerankItem(_Out):
    index: int
    score: float
    relevance_score: float
    document: Optional[str] = None
    meta_info: MetaInfo


class RerankResponse(RootModel[list[RerankItem]]):
    """Best first; at most top_n items."""


class Success(_Out):
    success: bool


class ModelInfo(_Out):
    model_path: str
    tokenizer_path: Optional[str]
    is_generation: bool
    chat_template: Optional[str] = None
    bos_token: Optional[str] = None
    eos_token: Optional[str] = None


class WeightVersion(_Out):
    weight_version: Optional[str]


class LoRAAdapters(_Out):
    """/load_lora_adapter and /unload_lora_adapter: the adapters loaded afterwards (name -> path)."""
    success: bool
    message: str
    loaded_adapters: dict[str, str]


class ServerInfo(_Out):
    """Every server argument (the keys masked), the scheduler's figures and the versions."""
    model_path: str
    version: str
    versions: dict[str, str]
    max_total_num_tokens: int
    context_length: int


class KVIntegrity(_Out):
    ok: bool
    message: str
    num_running_reqs: int
    num_queue_reqs: int
    num_api_requests: int


class ParsedCall(_Out):
    tool_index: int
    name: Optional[str]
    parameters: str


class FunctionCallResult(_Out):
    normal_text: str
    calls: list[ParsedCall]


class SeparateReasoningResult(_Out):
    reasoning_text: Optional[str]
    text: Optional[str]


# -- the diffusion server (images_api.py) ------------------------------------------------------
class ImageData(_Out):
    """One image (or video): base64 of the file, or a URL under /v1/images/files/."""
    b64_json: Optional[str] = None
    url: Optional[str] = None


class ImagesResponse(_Out):
    created: int
    data: list[ImageData]
    output_format: str


class DiffusionModelInfo(_Out):
    model_path: str
    is_generation: bool
    model_type: Literal["diffusion"]
    pipeline_class: str
    task: str
    default_size: str
