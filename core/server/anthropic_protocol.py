"""Request models of POST /v1/messages and /v1/messages/count_tokens (Anthropic Messages API).

Content blocks stay dicts: their ``type`` decides their shape, and anthropic_input checks each
one and names the field (``messages.1.content.0.tool_use_id``). Unknown top-level fields are a 400
naming the field, except the ones that do not change the output (metadata, service_tier, ...).
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AnthropicMessage(_Strict):
    role: Literal["user", "assistant"]
    content: Union[str, list[dict[str, Any]]]


class AnthropicTool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: Optional[str] = None
    input_schema: dict[str, Any]
    type: Optional[str] = None              # "custom" (or absent): server tools are refused
    cache_control: Optional[dict[str, Any]] = None


class ToolChoice(_Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: Optional[str] = None
    disable_parallel_tool_use: Optional[bool] = None


class ThinkingConfig(_Strict):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: Optional[int] = None


class OutputFormat(_Strict):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Strict):
    effort: Optional[str] = None            # -> a thinking budget, as reasoning effort
    format: Optional[OutputFormat] = None   # -> the JSON-schema grammar


class _Conversation(_Strict):
    model: Optional[str] = None
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: Union[str, list[dict[str, Any]], None] = None
    tools: Optional[list[AnthropicTool]] = None
    tool_choice: Optional[ToolChoice] = None
    thinking: Optional[ThinkingConfig] = None


class MessagesRequest(_Conversation):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}]})
    max_tokens: int
    stop_sequences: Optional[list[str]] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    stream: bool = False
    output_config: Optional[OutputConfig] = None
    # accepted and ignored: they do not change the output
    metadata: Optional[dict[str, Any]] = None
    service_tier: Optional[str] = None
    container: Optional[Any] = None
    cache_control: Optional[dict[str, Any]] = None   # the prefix cache works without being asked
    inference_geo: Optional[str] = None
    speed: Optional[str] = None
    user_profile_id: Optional[str] = None
    workspace_id: Optional[str] = None
    diagnostics: Optional[Any] = None


class CountTokensRequest(_Conversation):
    model_config = ConfigDict(json_schema_extra={"examples": [{"messages": [{"role": "user", "content": "Hi"}]}]})
    pass
