"""Outlines backend: regex and JSON schema through outlines_core's Index/Guide.

A JSON schema becomes a regex (outlines_core's json-schema-to-regex, honouring
--constrained-json-whitespace-pattern); a regex becomes an Index: a DFA over token ids built
against the tokenizer's vocabulary in raw bytes (token_bytes.py). EBNF and structural tags are
context-free, which a regex cannot express: the backend declares them unsupported.

JSON-schema keywords outlines_core's converter ignores (integer minimum/maximum, for one) are not
enforced; use xgrammar when they matter.
"""
from __future__ import annotations

import threading
import torch

from kvyard.grammar import CompiledGrammar, GrammarBackend, GrammarConfig, GrammarError, GrammarMatcher

_BYTE_VOCAB_EOS = 256  # validation vocabulary: one token per byte, and an end token after them


class OutlinesMatcher(GrammarMatcher):
    """Wraps a Guide. End tokens are handled here: the Guide has no transition for its end
    token, so accepting one in a final state only marks the matcher terminated."""

    def __init__(self, index, eos_token_ids: tuple[int, ...]):
        from outlines_core import Guide

        self._index = index
        self._guide = Guide(index)
        self._eos = eos_token_ids
        self._history: list[int] = []       # accepted tokens, for rollback past the Guide's window
        self._terminated = False

    def accept_token(self, token_id: int) -> bool:
        token_id = int(token_id)
        if self._terminated:
            return False
        if token_id in self._eos:
            if not self._guide.is_finished():
                return False
            self._terminated = True
        else:
            try:
                self._guide.advance(token_id, return_tokens=False)
            except ValueError:  # no transition: the state is unchanged
                return False
        self._history.append(token_id)
        return True

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        target = bitmask[row]
        self._guide.write_mask_into(target.data_ptr(), target.numel(), target.element_size())
        if self._guide.is_finished():
            for token_id in self._eos:
                if token_id < target.numel() * 32:
                    _set_bit(target, token_id)

    def is_terminated(self) -> bool:
        return self._terminated

    def rollback(self, num_tokens: int) -> None:
        if num_tokens > len(self._history):
            raise ValueError(f"num_tokens: cannot roll back {num_tokens} tokens, only "
                             f"{len(self._history)} were accepted")
        if num_tokens == 0:
            return
        keep = self._history[:-num_tokens]
        guide_steps = num_tokens - int(self._terminated)  # the end token never entered the Guide
        self._terminated = False
        if guide_steps <= self._guide.get_allowed_rollback():
            if guide_steps:
                self._guide.rollback_state(guide_steps)
            self._history = keep
        else:
            self._replay(keep)

    def reset(self) -> None:
        self._replay([])

    def copy(self) -> "OutlinesMatcher":
        twin = OutlinesMatcher(self._index, self._eos)
        twin._replay(self._history)
        return twin

    def _replay(self, tokens: list[int]) -> None:
        self._guide.reset()
        self._history, self._terminated = [], False
        for token_id in tokens:
            if not self.accept_token(token_id):
                raise RuntimeError(f"replaying token {token_id} failed; the history is inconsistent")


def _set_bit(row: torch.Tensor, token_id: int) -> None:
    word, bit = divmod(token_id, 32)
    value = (int(row[word]) & 0xFFFFFFFF) | (1 << bit)
    row[word] = value - (1 << 32) if value >= (1 << 31) else value


class OutlinesCompiled(CompiledGrammar):
    def __init__(self, index, eos_token_ids: tuple[int, ...]):
        self.index = index
        self.eos_token_ids = eos_token_ids

    def new_matcher(self) -> OutlinesMatcher:
        return OutlinesMatcher(self.index, self.eos_token_ids)


class OutlinesBackend(GrammarBackend):
    supports = frozenset({"json_schema", "regex"})

    def __init__(self, config: GrammarConfig):
        super().__init__(config)
        self._vocabulary = None
        self._eos: tuple[int, ...] = tuple(config.eos_token_ids)
        self._lock = threading.Lock()

    def validate(self, kind: str, spec: str) -> None:
        """A schema must convert; a regex must build a DFA (over a one-token-per-byte vocabulary,
        which is fast and accepts every byte string the real vocabulary can spell)."""
        regex = self._to_regex(kind, spec)
        if kind == "regex":
            _build_index(kind, regex, _byte_vocabulary())

    def compile(self, kind: str, spec: str) -> OutlinesCompiled:
        regex = self._to_regex(kind, spec)
        vocabulary = self._get_vocabulary()
        return OutlinesCompiled(_build_index(kind, regex, vocabulary), self._eos)

    def _to_regex(self, kind: str, spec: str) -> str:
        if kind == "regex":
            return spec
        if kind == "json_schema":
            from outlines_core.json_schema import build_regex_from_schema

            try:
                return build_regex_from_schema(spec, self.config.whitespace_pattern)
            except (ValueError, TypeError) as exc:
                raise GrammarError(f"json_schema: {_one_line(exc)}") from None
        raise GrammarError(f"{kind}: the outlines grammar backend does not support {kind}")

    def _get_vocabulary(self):
        with self._lock:  # compiles may run on several worker threads
            if self._vocabulary is None:
                from outlines_core import Vocabulary

                from kvyard_plugins.grammar.token_bytes import normal_token_bytes

                cfg = self.config
                if cfg.tokenizer_factory is None:
                    raise GrammarError("the outlines backend needs the tokenizer (started with --skip-tokenizer-init?)")
                tokenizer = cfg.tokenizer_factory()
                if not self._eos:
                    self._eos = (tokenizer.eos_token_id,)
                by_bytes: dict[bytes, list[int]] = {}
                for token_id, data in normal_token_bytes(tokenizer).items():
                    if token_id < cfg.vocab_size and token_id not in self._eos:
                        by_bytes.setdefault(data, []).append(token_id)
                self._vocabulary = Vocabulary(self._eos[0], by_bytes)
            return self._vocabulary


_byte_vocab = None


def _byte_vocabulary():
    global _byte_vocab
    if _byte_vocab is None:
        from outlines_core import Vocabulary
        _byte_vocab = Vocabulary(_BYTE_VOCAB_EOS, {bytes([b]): [b] for b in range(256)})
    return _byte_vocab


def _build_index(kind: str, regex: str, vocabulary):
    from outlines_core import Index

    try:
        return Index(regex, vocabulary)
    except (ValueError, TypeError) as exc:
        raise GrammarError(f"{kind}: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
