"""Incremental detokenization: stop strings never leak, held-back text is released at the end."""
from __future__ import annotations

from kvyard.frontend.detokenizer import DecodeState, next_delta, visible_text


class CharTokenizer:
    """Token i is the character chr(i); 0 is a special token."""

    def decode(self, ids, skip_special_tokens=True, **_):
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i == 0))


def ids(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_stop_string_is_cut_and_never_streamed():
    tok, state = CharTokenizer(), DecodeState(stop=("STOP",))
    out, streamed = ids("hello STOP"), ""
    for n in range(1, len(out)):  # the request finishes as soon as STOP is complete
        streamed += next_delta(tok, out[:n], state, None)
        assert "S" not in streamed  # "S" might start the stop string: held back
    streamed += next_delta(tok, ids("hello STOP"), state, {"type": "stop", "matched": "STOP"})
    assert streamed == "hello "


def test_no_stop_trim_keeps_the_stop_string():
    tok = CharTokenizer()
    state = DecodeState(stop=("END",), no_stop_trim=True)
    assert visible_text(tok, ids("abcEND"), state, {"type": "stop", "matched": "END"}) == "abcEND"


def test_stop_token_is_trimmed_from_text():
    tok = CharTokenizer()
    text = visible_text(tok, ids("ab!"), DecodeState(), {"type": "stop", "matched": ord("!")})
    assert text == "ab"


def test_incomplete_character_is_held_back():
    class Partial(CharTokenizer):
        def decode(self, ids, **kw):  # token 1 is half a character until another token follows
            text = super().decode([i for i in ids if i != 1], **kw)
            return text + "\ufffd" if ids and ids[-1] == 1 else text
    tok, state = Partial(), DecodeState()
    assert next_delta(tok, ids("ab") + [1], state, None) == "ab"
    assert next_delta(tok, ids("ab") + [1] + ids("c"), state, {"type": "length", "matched": None}) == "c"
