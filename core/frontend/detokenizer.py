"""Incremental detokenization: the text of a request's output so far, safe to show.

Stop strings never leak: a finished request's text is cut at its stop string, and while it
runs, the last characters that could still grow into a stop string are held back, as is a
trailing incomplete UTF-8 character.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class DecodeState:
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    stop: tuple[str, ...] = ()
    no_stop_trim: bool = False
    sent_chars: int = 0      # characters already handed out


def decode(tokenizer, ids: list[int], state: DecodeState) -> str:
    kwargs = {"skip_special_tokens": state.skip_special_tokens}
    if not state.spaces_between_special_tokens:
        kwargs["spaces_between_special_tokens"] = False
    return tokenizer.decode(ids, **kwargs)


def visible_text(tokenizer, ids: list[int], state: DecodeState,
                 finish_reason: Optional[dict]) -> str:
    """The whole text that may be shown now (a prefix of the final text)."""
    if finish_reason is not None:
        matched = finish_reason.get("matched")
        if isinstance(matched, int) and not state.no_stop_trim and ids and ids[-1] == matched:
            ids = ids[:-1]
        text = decode(tokenizer, ids, state)
        if isinstance(matched, str) and not state.no_stop_trim:
            cut = text.find(matched)
            if cut >= 0:
                text = text[:cut]
        return text
    text = decode(tokenizer, ids, state)
    hold = max((len(s) for s in state.stop), default=1) - 1
    if hold > 0:
        text = text[:max(0, len(text) - hold)]
    return text.rstrip("\ufffd")


def next_delta(tokenizer, ids: list[int], state: DecodeState, finish_reason: Optional[dict]) -> str:
    """Text not handed out before; advances state.sent_chars."""
    text = visible_text(tokenizer, ids, state, finish_reason)
    delta = text[state.sent_chars:]
    state.sent_chars = max(state.sent_chars, len(text))
    return delta
