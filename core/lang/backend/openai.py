"""OpenAI: any OpenAI-compatible endpoint (OpenAI itself, vLLM, SGLang, kvyard's /v1).

Chat models (``is_chat_model=True``, the default) generate at an assistant turn from the
state's messages (/v1/chat/completions; text already in the open assistant turn is sent with
SGLang's ``continue_final_message``). Completion models (``is_chat_model=False``) get the
state's text as the prompt (/v1/completions); roles are rendered with ``chat_template``.

select() needs each option's prompt logprobs: /v1/completions with echo and logprobs, which
completion mode uses; an option's tokens are those that end after the prefix (by
text_offset). Where the endpoint gives none — the chat API, or a server without echo
logprobs — it is a clear NotSupportedError/BackendError. ``regex`` and the typed gens use
SGLang's ``regex`` extra field; json_schema uses OpenAI's response_format.
"""
from __future__ import annotations

import json
import os
from typing import Iterator, Optional, Sequence

from kvyard.lang.backend.base import Backend, PromptView
from kvyard.lang.backend.http import CONNECT_TIMEOUT_S, READ_TIMEOUT_S, make_client, request_json, stream_events
from kvyard.lang.chat_template import PLAIN, ChatTemplate, get_chat_template
from kvyard.lang.choices import ChoicesDecision, ChoicesMethod
from kvyard.lang.errors import BackendError, NotSupportedError
from kvyard.lang.sampling import SamplingParams

# SamplingParams field -> OpenAI body field (the ones after "stop" are SGLang extras)
BODY_FIELDS = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p",
               "frequency_penalty": "frequency_penalty", "presence_penalty": "presence_penalty", "stop": "stop",
               "top_k": "top_k", "min_p": "min_p", "min_new_tokens": "min_tokens", "ignore_eos": "ignore_eos",
               "stop_token_ids": "stop_token_ids", "regex": "regex"}


class OpenAI(Backend):
    supports_images = False

    def __init__(self, model_name: str, base_url: Optional[str] = None, api_key: Optional[str] = None,
                 is_chat_model: bool = True, chat_template=None, connect_timeout: float = CONNECT_TIMEOUT_S,
                 read_timeout: float = READ_TIMEOUT_S):
        self.model_name = model_name
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1").rstrip("/")
        self.name = f"OpenAI({self.base_url})"
        self.is_chat_model = is_chat_model
        self.template = get_chat_template(chat_template) if chat_template is not None else PLAIN
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.client = make_client(self.base_url, key, connect_timeout, read_timeout)

    def get_chat_template(self) -> ChatTemplate:
        return self.template

    def _post(self, path: str, body: dict) -> dict:
        return request_json(self.client, self.base_url, "POST", path, json=body)

    def _stream(self, path: str, body: dict) -> Iterator[dict]:
        return stream_events(self.client, self.base_url, path, body)

    # -- generation --------------------------------------------------------------------------
    def _body(self, prompt: PromptView, params: SamplingParams) -> tuple[str, dict]:
        body = {"model": self.model_name}
        for field, name in BODY_FIELDS.items():
            value = getattr(params, field)
            if value is not None:
                body[name] = value
        if params.json_schema is not None:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "output", "schema": json.loads(params.json_schema)}}
        if params.return_logprob:
            body["logprobs"] = True if self.is_chat_model else max(params.top_logprobs_num or 0, 1)
            if self.is_chat_model and params.top_logprobs_num:
                body["top_logprobs"] = params.top_logprobs_num
        if not self.is_chat_model:
            return "/completions", {**body, "prompt": prompt.text}
        if prompt.role != "assistant":
            raise NotSupportedError("gen: a chat model generates only inside an assistant turn "
                                    "(s += assistant(gen(...))); for text programs use OpenAI(..., is_chat_model=False)")
        messages = list(prompt.messages)
        if prompt.role_text:
            messages.append({"role": "assistant", "content": prompt.role_text})
            body["continue_final_message"] = True
        return "/chat/completions", {**body, "messages": messages}

    def generate(self, prompt: PromptView, params: SamplingParams) -> tuple[str, dict]:
        path, body = self._body(prompt, params)
        reply = self._post(path, body)
        choice = reply["choices"][0]
        text = choice["message"]["content"] if self.is_chat_model else choice["text"]
        meta = _meta(reply.get("usage"), choice.get("finish_reason"), reply.get("id"))
        if params.return_logprob and choice.get("logprobs"):
            meta["output_token_logprobs"] = _output_logprobs(choice["logprobs"], self.is_chat_model)
        return text or "", meta

    def generate_stream(self, prompt: PromptView, params: SamplingParams):
        path, body = self._body(prompt, params)
        body.update(stream=True, stream_options={"include_usage": True})
        usage, finish, rid = None, None, None
        for event in self._stream(path, body):
            rid = event.get("id", rid)
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                delta = choice["delta"].get("content") if self.is_chat_model else choice.get("text")
                finish = choice.get("finish_reason") or finish
                if delta:
                    yield delta, None
        yield "", _meta(usage, finish, rid)

    # -- choices ---------------------------------------------------------------------------
    def select(self, prompt: PromptView, choices: Sequence[str], method: ChoicesMethod) -> ChoicesDecision:
        if self.is_chat_model:
            raise NotSupportedError("select: choices need each option's prompt logprobs, which the chat API does "
                                    "not return; use OpenAI(..., is_chat_model=False) on an endpoint with echo "
                                    "logprobs, or RuntimeEndpoint")
        texts = [prompt.text + c for c in choices]
        scored = self._prompt_logprobs(texts)
        options = [[(lp, tok) for lp, tok, start in row if start + len(tok) > len(prompt.text) and lp is not None]
                   for row in scored]
        if not all(options):
            raise BackendError(f"select: {self.base_url} returned no logprobs for an option's tokens")
        conditional = [[lp for lp, _ in o] for o in options]
        unconditional = None
        if method.requires_unconditional_logprobs:
            alone = self._prompt_logprobs(["".join(tok for _, tok in o) for o in options])
            unconditional = [[0.0] + [lp for lp, _, _ in row[1:]][-(len(o) - 1):] if len(o) > 1 else [0.0]
                             for row, o in zip(alone, options)]
        return method(choices, conditional, unconditional)

    def _prompt_logprobs(self, texts: list[str]) -> list[list[tuple]]:
        """Per text: (logprob or None, token, text offset) of every prompt token."""
        reply = self._post("/completions", {"model": self.model_name, "prompt": texts, "max_tokens": 0,
                                            "echo": True, "logprobs": 0, "temperature": 0.0})
        rows = [None] * len(texts)
        for choice in reply.get("choices", []):
            lp = choice.get("logprobs") or {}
            if not lp.get("tokens") or lp.get("token_logprobs") is None or lp.get("text_offset") is None:
                raise BackendError(f"select: {self.base_url} returned no prompt logprobs (echo with logprobs), "
                                   "which choices need")
            rows[choice.get("index", 0)] = list(zip(lp["token_logprobs"], lp["tokens"], lp["text_offset"]))
        if any(r is None for r in rows):
            raise BackendError(f"select: {self.base_url} returned {len(reply.get('choices', []))} choices "
                               f"for {len(texts)} prompts")
        return rows

    def shutdown(self) -> None:
        self.client.close()


def _meta(usage: Optional[dict], finish: Optional[str], rid: Optional[str]) -> dict:
    usage = usage or {}
    details = usage.get("prompt_tokens_details") or {}
    return {"id": rid, "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
            "cached_tokens": details.get("cached_tokens"), "finish_reason": finish}


def _output_logprobs(logprobs: dict, chat: bool) -> list[tuple]:
    if chat:
        return [(e["logprob"], None, e["token"]) for e in logprobs.get("content") or []]
    return [(lp, None, tok) for lp, tok in zip(logprobs.get("token_logprobs") or [], logprobs.get("tokens") or [])]
