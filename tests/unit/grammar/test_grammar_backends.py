"""Grammar backends (xgrammar, outlines) on a tiny hand-built byte-level tokenizer: each mask
allows exactly the valid continuations, matchers advance/terminate/roll back, errors carry the
compiler's message, and the API-side checker turns every problem into a 400."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from kvyard.errors import RequestError
from kvyard.grammar import (GrammarConfig, GrammarError, allocate_bitmask, bitmask_to_bool,
                            bool_to_bitmask, grammar_spec)
from kvyard.grammar.manager import GrammarChecker, backends_supporting, load_backend
from kvyard.plugins import registry
from kvyard.sampling.params import SamplingParams
from kvyard_plugins.grammar.token_bytes import token_to_bytes, vocab_style
from tiny_tokenizer import build_tokenizer, byte_level

BOS, EOS = 0, 1
EXTRA_IDS = 6  # the model's vocabulary is wider than the tokenizer's (padding rows)
BACKENDS = ["xgrammar", "outlines"]


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return build_tokenizer(("<s>", "</s>"), eos="</s>", bos="<s>")


@pytest.fixture(scope="module")
def pieces(tiny_tokenizer) -> dict[int, bytes]:
    """token id -> bytes, for every normal token."""
    style = vocab_style(tiny_tokenizer)
    return {i: token_to_bytes(t, style) for t, i in tiny_tokenizer.get_vocab().items() if i not in (BOS, EOS)}


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request, tiny_tokenizer):
    config = GrammarConfig(vocab_size=len(tiny_tokenizer) + EXTRA_IDS, eos_token_ids=(EOS,),
                           tokenizer_factory=lambda: tiny_tokenizer)
    return load_backend(request.param, config)


def allowed(backend, matcher) -> set[int]:
    bitmask = allocate_bitmask(2, backend.config.vocab_size)
    bitmask[1] = 0x5A5A5A5A  # garbage: every bit of the row must be written
    backend.fill_bitmasks([matcher], bitmask, [1])
    mask = bitmask_to_bool(bitmask, backend.config.vocab_size)
    assert mask[0].all(), "rows nobody filled must stay all-allowed"
    return set(mask[1].nonzero().flatten().tolist())


def expected(language: set[bytes], prefix: bytes, pieces: dict[int, bytes]) -> set[int]:
    ids = {i for i, b in pieces.items() if any(s.startswith(prefix + b) for s in language)}
    return ids | ({EOS} if prefix in language else set())


def walk_exhaustively(backend, compiled, language: set[bytes], pieces: dict[int, bytes]) -> int:
    """Every token path through the language: the mask at each prefix is exactly the set of
    tokens that keep it a prefix of some word (plus EOS on a whole word). Returns paths seen."""
    stack, paths = [(compiled.new_matcher(), b"")], 0
    while stack:
        matcher, prefix = stack.pop()
        want = expected(language, prefix, pieces)
        assert allowed(backend, matcher) == want, prefix
        for token in sorted(want):
            child = matcher.copy()
            assert child.accept_token(token)
            if token == EOS:
                assert child.is_terminated()
                paths += 1
            else:
                stack.append((child, prefix + pieces[token]))
    return paths


# -- masks are exact -------------------------------------------------------------------------
def test_regex_masks_allow_exactly_the_valid_continuations(backend, pieces):
    compiled = backend.compile("regex", "(ab|ba|a12)c?")
    language = {b"ab", b"ba", b"a12", b"abc", b"bac", b"a12c"}
    assert walk_exhaustively(backend, compiled, language, pieces) > len(language)  # several spellings


def test_regex_with_multibyte_characters_uses_raw_bytes(backend, pieces):
    """'é' is one token or two half-character tokens; both spellings must be allowed."""
    compiled = backend.compile("regex", "aé")
    walk_exhaustively(backend, compiled, {"aé".encode()}, pieces)


def test_ebnf_masks_allow_exactly_the_valid_continuations(pieces, tiny_tokenizer):
    config = GrammarConfig(vocab_size=len(tiny_tokenizer) + EXTRA_IDS, eos_token_ids=(EOS,),
                           tokenizer_factory=lambda: tiny_tokenizer)
    backend = load_backend("xgrammar", config)
    compiled = backend.compile("ebnf", 'root ::= ("ab" | "ba") ("1" | "")')
    walk_exhaustively(backend, compiled, {b"ab", b"ba", b"ab1", b"ba1"}, pieces)


def test_json_schema_walk(backend, tiny_tokenizer, pieces):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    matcher = backend.compile("json_schema", json.dumps(schema)).new_matcher()
    by_text = {b.decode("utf-8", "replace"): i for i, b in pieces.items()}
    assert by_text["{"] in allowed(backend, matcher) and by_text["a"] not in allowed(backend, matcher)
    for text in ['{"', "a", '":', " 1", "2", "}"]:
        assert by_text[text] in allowed(backend, matcher), text
        assert matcher.accept_token(by_text[text]), text
    assert EOS in allowed(backend, matcher) and by_text["a"] not in allowed(backend, matcher)
    assert not matcher.accept_token(by_text["a"])   # rejected, state unchanged
    assert matcher.accept_token(EOS) and matcher.is_terminated()


def test_json_object_mode(tiny_tokenizer, pieces):
    """response_format json_object arrives as the schema {"type": "object"}."""
    config = GrammarConfig(vocab_size=len(tiny_tokenizer), eos_token_ids=(EOS,),
                           tokenizer_factory=lambda: tiny_tokenizer)
    backend = load_backend("xgrammar", config)
    matcher = backend.compile("json_schema", '{"type": "object"}').new_matcher()
    first = allowed(backend, matcher)
    assert {i for i, b in pieces.items() if b in (b"{", b'{"')} <= first
    assert not {i for i, b in pieces.items() if b in (b"[", b"1", b"a")} & first


def test_tokens_past_the_tokenizer_and_special_tokens_are_never_allowed(backend, tiny_tokenizer):
    compiled = backend.compile("regex", "[a-c0-9]*")
    mask = allowed(backend, compiled.new_matcher())
    assert not {i for i in mask if i >= len(tiny_tokenizer)}
    assert BOS not in mask


def test_structural_tag(tiny_tokenizer, pieces):
    config = GrammarConfig(vocab_size=len(tiny_tokenizer), eos_token_ids=(EOS,),
                           tokenizer_factory=lambda: tiny_tokenizer)
    backend = load_backend("xgrammar", config)
    tag = {"type": "structural_tag", "format": {"type": "const_string", "value": "ab"}}
    walk_exhaustively(backend, backend.compile("structural_tag", json.dumps(tag)), {b"ab"}, pieces)


# -- matcher state ------------------------------------------------------------------------------
def test_rollback_copy_and_reset(backend, pieces):
    by_bytes = {b: i for i, b in pieces.items()}
    matcher = backend.compile("regex", "a12c").new_matcher()
    start = allowed(backend, matcher)
    assert matcher.accept_token(by_bytes[b"a"])
    after_a = allowed(backend, matcher)
    twin = matcher.copy()
    assert matcher.accept_token(by_bytes[b"12"]) and matcher.accept_token(by_bytes[b"c"])
    assert matcher.accept_token(EOS) and matcher.is_terminated()
    assert allowed(backend, twin) == after_a and not twin.is_terminated()   # the copy is independent
    matcher.rollback(3)
    assert not matcher.is_terminated() and allowed(backend, matcher) == after_a
    matcher.reset()
    assert allowed(backend, matcher) == start


# -- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, spec, words", [
    ("json_schema", '{"type": "objekt"}', "objekt"),
    ("json_schema", "{not json", "json"),
    ("regex", "[a-", ""),
])
def test_bad_specs_fail_validation_and_compile_with_the_compilers_message(backend, kind, spec, words):
    for call in (backend.validate, backend.compile):
        with pytest.raises(GrammarError) as info:
            call(kind, spec)
        message = str(info.value)
        assert message.startswith(f"{kind}: ") and words.lower() in message.lower()
        assert "\n" not in message and ".cc:" not in message


def test_bad_ebnf_names_the_undefined_rule(tiny_tokenizer):
    backend = load_backend("xgrammar", GrammarConfig(vocab_size=len(tiny_tokenizer)))
    with pytest.raises(GrammarError, match=r'^ebnf: .*Rule "foo" is not defined'):
        backend.validate("ebnf", "root ::= foo")


def test_outlines_declares_what_it_lacks():
    outlines = registry("grammar_backends").get("outlines")
    xgrammar = registry("grammar_backends").get("xgrammar")
    assert outlines.supports == {"json_schema", "regex"}
    assert xgrammar.supports == {"json_schema", "regex", "ebnf", "structural_tag"}
    assert backends_supporting("ebnf", exclude="outlines") == ["xgrammar"]
    with pytest.raises(GrammarError, match="does not support ebnf"):
        load_backend("outlines", GrammarConfig(vocab_size=8)).validate("ebnf", 'root ::= "a"')


def test_validation_needs_no_tokenizer():
    for name in BACKENDS:
        load_backend(name, GrammarConfig(vocab_size=8)).validate("regex", "[0-9]+")


# -- the API-side checker -------------------------------------------------------------------------
def params(**grammar) -> SamplingParams:
    p = SamplingParams.from_dict(grammar)
    p.verify(100)
    return p.normalize(None)


def test_checker_rejects_with_400_naming_the_field():
    checker = GrammarChecker("xgrammar", vocab_size=100)
    checker.check(params())                                   # no grammar: nothing to do
    checker.check(params(json_schema={"type": "object"}))     # a dict is JSON text after normalize
    with pytest.raises(RequestError) as info:
        checker.check(params(regex="[a-"))
    assert info.value.status == 400 and info.value.param == "regex" and "Unclosed '['" in info.value.message
    with pytest.raises(RequestError, match="regex: .*Unclosed"):   # cached failures fail the same way
        checker.check(params(regex="[a-"))


def test_checker_names_alternatives_and_disabled_backend():
    with pytest.raises(RequestError) as info:
        GrammarChecker("outlines", vocab_size=100).check(params(ebnf='root ::= "a"'))
    assert info.value.param == "ebnf"
    assert "outlines grammar backend does not support ebnf" in info.value.message
    assert "xgrammar" in info.value.message
    with pytest.raises(RequestError, match=r"json_schema: structured output is disabled \(--grammar-backend none\)"):
        GrammarChecker("none", vocab_size=100).check(params(json_schema='{"type": "object"}'))


def test_grammar_spec_reads_the_one_field_set():
    assert grammar_spec(params()) is None
    assert grammar_spec(params(regex="a+")) == ("regex", "a+")
    assert grammar_spec(params(json_schema={"type": "integer"})) == ("json_schema", '{"type": "integer"}')
    assert grammar_spec(SimpleNamespace(json_schema=None, regex=None, ebnf="x", structural_tag=None)) == ("ebnf", "x")


# -- helpers -----------------------------------------------------------------------------------
def test_bitmask_round_trip():
    torch.manual_seed(0)
    mask = torch.rand(3, 70) < 0.5
    mask[0, 31] = mask[1, 63] = True   # sign bits of a word
    assert torch.equal(bitmask_to_bool(bool_to_bitmask(mask), 70), mask)
    assert bitmask_to_bool(allocate_bitmask(2, 70), 70).all()


def test_token_bytes_spellings():
    assert token_to_bytes(byte_level("é a"), "byte_level") == "é a".encode()
    assert token_to_bytes("\u2581ab", "sentencepiece") == b" ab"
    assert token_to_bytes("<0xC3>", "sentencepiece") == b"\xc3"
    assert token_to_bytes("ab", "raw") == b"ab"


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="vocab_size"):
        GrammarConfig(vocab_size=0)
    with pytest.raises(ValueError, match="compile_threads"):
        GrammarConfig(vocab_size=8, compile_threads=0)


def test_xgrammar_batched_fill_equals_one_by_one(tiny_tokenizer, pieces, monkeypatch):
    from kvyard_plugins.grammar import xgrammar_backend

    monkeypatch.setattr(xgrammar_backend, "BATCH_FILL_MIN_ROWS", 1)
    monkeypatch.setattr(xgrammar_backend, "BATCH_FILL_MIN_CPUS", 1)
    config = GrammarConfig(vocab_size=len(tiny_tokenizer) + EXTRA_IDS, eos_token_ids=(EOS,),
                           tokenizer_factory=lambda: tiny_tokenizer)
    backend = load_backend("xgrammar", config)
    compiled = backend.compile("regex", "(ab|ba|a12)c?")
    by_bytes = {b: i for i, b in pieces.items()}
    matchers = [compiled.new_matcher() for _ in range(3)]
    assert matchers[1].accept_token(by_bytes[b"a"])
    assert matchers[2].accept_token(by_bytes[b"ab"])
    batched, single = allocate_bitmask(5, config.vocab_size), allocate_bitmask(5, config.vocab_size)
    backend.fill_bitmasks(matchers, batched, [4, 0, 2])
    for matcher, row in zip(matchers, [4, 0, 2]):
        matcher.fill_bitmask(single, row)
    assert torch.equal(batched, single) and (batched[1] == -1).all() and (batched[3] == -1).all()


def test_xgrammar_bounded_strings_keep_control_characters_out():
    """A string with maxLength must not take a raw tab (invalid JSON), as unbounded ones don't."""
    pytest.importorskip("xgrammar")
    from xgrammar.testing import _is_grammar_accept_string as accepts
    from kvyard_plugins.grammar.xgrammar_backend import json_schema_grammar

    schema = json.dumps({"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
                         "required": ["city"]})
    grammar = json_schema_grammar(schema)
    assert accepts(grammar, '{"city": "Paris"}')
    assert not accepts(grammar, '{"city": "a\tb"}')
