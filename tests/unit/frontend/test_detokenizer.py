"""Incremental detokenization: stop strings never leak, held-back text is released at the end,
each update decodes a bounded window, and the deltas add up to the full decode."""
from __future__ import annotations

from kvyard.frontend.detokenizer import DecodeState, Detokenizer


class CharTokenizer:
    """Token i is the character chr(i); 0 is a special token."""

    def __init__(self):
        self.decoded = 0   # ids decoded so far, over all calls

    def decode(self, ids, skip_special_tokens=True, **_):
        self.decoded += len(ids)
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i == 0))


def ids(text: str) -> list[int]:
    return [ord(c) for c in text]


def stream(tok, state, out, finish):
    d, streamed = Detokenizer(tok, state), ""
    for n in range(1, len(out)):
        d.update(out[:n], None)
        streamed += d.take_delta()
    d.update(out, finish)
    return d, streamed + d.take_delta()


def test_stop_string_is_cut_and_never_streamed():
    tok, state = CharTokenizer(), DecodeState(stop=("STOP",))
    d, streamed = Detokenizer(tok, state), ""
    out = ids("hello STOP")
    for n in range(1, len(out)):  # the request finishes as soon as STOP is complete
        d.update(out[:n], None)
        streamed += d.take_delta()
        assert "S" not in streamed  # "S" might start the stop string: held back
    d.update(out, {"type": "stop", "matched": "STOP"})
    assert streamed + d.take_delta() == "hello "


def test_no_stop_trim_keeps_the_stop_string():
    d = Detokenizer(CharTokenizer(), DecodeState(stop=("END",), no_stop_trim=True))
    d.update(ids("abcEND"), {"type": "stop", "matched": "END"})
    assert d.text == "abcEND"


def test_stop_token_is_trimmed_from_text():
    d = Detokenizer(CharTokenizer(), DecodeState())
    d.update(ids("ab!"), {"type": "stop", "matched": ord("!")})
    assert d.text == "ab"


def test_incomplete_character_is_held_back():
    class Partial(CharTokenizer):
        def decode(self, ids, **kw):  # token 1 is half a character until another token follows
            text = super().decode([i for i in ids if i != 1], **kw)
            return text + "\ufffd" if ids and ids[-1] == 1 else text
    d = Detokenizer(Partial(), DecodeState())
    d.update(ids("ab") + [1], None)
    assert d.take_delta() == "ab"
    d.update(ids("ab") + [1] + ids("c"), {"type": "length", "matched": None})
    assert d.take_delta() == "c"


def test_deltas_add_up_to_the_full_decode_with_special_tokens():
    out = ids("one ") + [0] + ids("two three")
    _, streamed = stream(CharTokenizer(), DecodeState(), out, {"type": "length"})
    assert streamed == CharTokenizer().decode(out)


def test_each_update_decodes_a_bounded_window():
    """Streaming n tokens decodes O(n) ids in total while it runs, not O(n^2)."""
    tok, n = CharTokenizer(), 2000
    d = Detokenizer(tok, DecodeState())
    out = ids("x" * n)
    for k in range(1, n + 1):
        d.update(out[:k], None)
    assert d.text == "x" * n
    assert tok.decoded <= 4 * n
