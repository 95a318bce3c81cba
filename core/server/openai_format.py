"""Building OpenAI response objects from the engine's SGLang-shaped outputs.

An output is {"text", "output_ids", "meta_info"}; logprobs in meta_info are (logprob, token_id,
token_text) triples, the first prompt logprob is None.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Optional

FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort"}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"  # OpenAI's shape of tool call ids


def now() -> int:
    return int(time.time())


def finish_reason_of(meta: dict) -> Optional[str]:
    reason = meta.get("finish_reason")
    return FINISH_REASONS.get(reason["type"], reason["type"]) if reason else None


def matched_stop(meta: dict) -> Any:
    reason = meta.get("finish_reason") or {}
    return reason.get("matched") if reason.get("type") == "stop" else None


def usage_of(outs: list[dict], samples_per_prompt: int) -> dict:
    """Prompt tokens count once per prompt (not once per sample), as OpenAI counts them;
    ``prompt_tokens_details.cached_tokens`` (always there) is the prefix cache's hits."""
    firsts = outs[::samples_per_prompt]
    prompt = sum(o["meta_info"]["prompt_tokens"] for o in firsts)
    completion = sum(o["meta_info"]["completion_tokens"] for o in outs)
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    usage["prompt_tokens_details"] = {"cached_tokens": sum(o["meta_info"]["cached_tokens"] for o in firsts)}
    return usage


# -- logprobs ------------------------------------------------------------------------------
def _token_entry(lp: float, text: str) -> dict:
    return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(token_lps: list, top_lps: list) -> dict:
    content = []
    for i, (lp, _, text) in enumerate(token_lps):
        top = top_lps[i] if i < len(top_lps) and top_lps[i] else []
        content.append({**_token_entry(lp, text), "top_logprobs": [_token_entry(t_lp, t) for t_lp, _, t in top]})
    return {"content": content}


def completion_logprobs(token_lps: list, top_lps: list, offset: int, want_top: bool) -> dict:
    """The legacy completions shape; ``offset`` = characters before the first token."""
    tokens, values, tops, offsets = [], [], [], []
    for i, (lp, _, text) in enumerate(token_lps):
        tokens.append(text)
        values.append(lp)
        offsets.append(offset)
        offset += len(text)
        if want_top:
            top = top_lps[i] if i < len(top_lps) and top_lps[i] else None
            tops.append({t: t_lp for t_lp, _, t in top} if top else None)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops if want_top else None,
            "text_offset": offsets}


# -- tool calls ----------------------------------------------------------------------------
def tool_call_dict(call, call_id: Optional[str] = None, index: Optional[int] = None) -> dict:
    """A parser's ToolCallItem as an OpenAI tool call (a stream delta when index is given)."""
    function = {"arguments": call.parameters}
    if call.name is not None:
        function["name"] = call.name
    out: dict = {"function": function}
    if index is not None:
        out["index"] = index
    if call.name is not None:
        out.update(id=call_id or new_call_id(), type="function")
    return out


def message_of_tool_call(call: dict) -> dict:
    """An assistant message's tool call as chat templates expect it: arguments as an object."""
    function = dict(call.get("function") or {})
    args = function.get("arguments")
    if isinstance(args, str):
        try:
            function["arguments"] = json.loads(args)
        except json.JSONDecodeError:
            pass
    return {**call, "function": function}
