"""The one output path of Engine and HTTP (kvyard.frontend.outputs): cumulative and incremental
stream items, token_ids without a tokenizer, single-vs-batch decided by prepare."""
from __future__ import annotations

from types import SimpleNamespace

from kvyard.frontend.detokenizer import DecodeState, Detokenizer
from kvyard.frontend.outputs import ChunkCursor, native_item, output_of, single_or_list


class CharTokenizer:
    def decode(self, ids, **_):
        return "".join(chr(i) for i in ids)


class FakeTM:
    def logprob_meta(self, state):
        return {}


def state(ids, detok=None, finish=None):
    return SimpleNamespace(rid="r", meta={"completion_tokens": len(ids)}, finish_reason=finish, first_token=None,
                           return_hidden_states=False,
                           created=0.0, return_logprob=False, embedding=None, output_ids=list(ids), detok=detok)


def test_cumulative_and_incremental_items():
    d = Detokenizer(CharTokenizer(), DecodeState())
    s, cursor, items = state([]), ChunkCursor(0), []
    for ch in "abc":
        s.output_ids.append(ord(ch))
        d.update(s.output_ids, None)
        s.detok = d
        c = cursor.next(s, output_of(FakeTM(), s))
        items.append((native_item(c, False, False), native_item(c, True, True)))
    assert [cum["text"] for cum, _ in items] == ["a", "ab", "abc"]
    assert [inc["text"] for _, inc in items] == ["a", "b", "c"]
    assert [inc["output_ids"] for _, inc in items] == [[97], [98], [99]]
    assert all(inc["index"] == 0 for _, inc in items)


def test_token_ids_without_tokenizer():
    out = output_of(FakeTM(), state([5, 6]))
    assert out["token_ids"] == out["output_ids"] == [5, 6] and out["text"] == ""


def test_single_or_list():
    assert single_or_list([1], False) == 1 and single_or_list([1], True) == [1]
