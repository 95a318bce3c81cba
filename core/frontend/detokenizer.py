"""Incremental detokenization: the text of a request's output so far, safe to show.

Each update decodes only a short window of ids, never the whole output: ``Detokenizer.update``
decodes ``ids[surr:read]`` and ``ids[surr:]`` and appends the difference to the committed text
(the surrounding tokens keep a tokenizer's context-dependent spaces right). The cost of one
update is bounded by the window, so a long stream costs O(tokens), not O(tokens²).

Invariants:
- ``committed`` is the decoding of ``ids[:read]``; it never ends in an incomplete UTF-8
  character (the window stays open until the replacement character goes away; meanwhile
  ``pending`` holds the window's complete characters).
- Stop strings never leak: while a request runs, the last ``len(longest stop) - 1`` characters
  are held back; a finished request's text is decoded once in full and cut at its stop string
  (or its stop token trimmed), so the final text equals ``tokenizer.decode(output_ids)``.
- ``visible`` only grows while the request runs, and the final text starts with it, so
  deltas (``take_delta``) concatenate to the final text.
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


def decode(tokenizer, ids: list[int], state: DecodeState) -> str:
    kwargs = {"skip_special_tokens": state.skip_special_tokens}
    if not state.spaces_between_special_tokens:
        kwargs["spaces_between_special_tokens"] = False
    return tokenizer.decode(ids, **kwargs)


def final_text(tokenizer, ids: list[int], state: DecodeState, finish_reason: dict) -> str:
    """A finished request's text: one full decode, cut at its stop string or stop token."""
    matched = finish_reason.get("matched")
    if isinstance(matched, int) and not state.no_stop_trim and ids and ids[-1] == matched:
        ids = ids[:-1]
    text = decode(tokenizer, ids, state)
    if isinstance(matched, str) and matched and not state.no_stop_trim:
        cut = text.find(matched)
        if cut >= 0:
            text = text[:cut]
    return text


class Detokenizer:
    """One request's text; call ``update`` once per scheduler update."""

    def __init__(self, tokenizer, state: DecodeState):
        self.tokenizer, self.state = tokenizer, state
        self.committed = ""       # decoding of ids[:read]
        self.pending = ""         # complete characters of an open window (before its last, partial one)
        self.surr = self.read = 0
        self.hold = max((len(s) for s in state.stop), default=1) - 1
        self.final: Optional[str] = None
        self.sent = 0             # characters handed out by take_delta

    def update(self, ids: list[int], finish_reason: Optional[dict]) -> None:
        if finish_reason is not None:
            self.final = final_text(self.tokenizer, ids, self.state, finish_reason)
            return
        if len(ids) <= self.read:
            return
        prefix = decode(self.tokenizer, ids[self.surr:self.read], self.state)
        full = decode(self.tokenizer, ids[self.surr:], self.state)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.committed += full[len(prefix):]
            self.surr, self.read, self.pending = self.read, len(ids), ""
        else:
            self.pending = full[len(prefix):].rstrip("\ufffd")

    def visible_len(self) -> int:
        if self.final is not None:
            return len(self.final)
        return max(0, len(self.committed) + len(self.pending) - self.hold)

    def _source(self) -> str:
        if self.final is not None:
            return self.final
        return self.committed + self.pending if self.pending else self.committed

    @property
    def text(self) -> str:
        """The whole text that may be shown now (a prefix of the final text)."""
        source = self._source()
        return source if self.final is not None or self.hold == 0 else source[:self.visible_len()]

    def take_delta(self) -> str:
        """Text not handed out before; O(delta), sliced from the pieces."""
        end, start = self.visible_len(), self.sent
        if end <= start:
            return ""
        self.sent = end
        if self.final is not None:
            return self.final[start:end]
        c = len(self.committed)
        return self.committed[start:min(end, c)] + self.pending[max(0, start - c):max(0, end - c)]
