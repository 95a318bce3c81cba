"""XGrammar backend: JSON schema, regex, EBNF and structural tags (the default backend).

xgrammar is imported on first use. The GrammarCompiler (with its own cache) is built from the
HF tokenizer on the first compile; masks are filled straight into the shared packed bitmask,
several rows at once through xgrammar's BatchGrammarMatcher.
"""
from __future__ import annotations

import logging
import os
import re
import threading
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from kvyard.grammar import (GRAMMAR_KINDS, CompiledGrammar, GrammarBackend, GrammarConfig, GrammarError,
                            GrammarMatcher)

logger = logging.getLogger(__name__)

# xgrammar's C++ errors start with "[12:00:00] /project/cpp/file.cc:123: " and sometimes
# "Check failed: (cond) is false: "; the user wants the sentence after them.
_CPP_PREFIX = re.compile(r"^\s*\[[\d:]+\]\s+\S+:\d+:\s*")
_CHECK_PREFIX = re.compile(r"^Check failed: \(.*?\) is false:\s*")
# xgrammar's BatchGrammarMatcher fills rows on its own threads: it pays off for large batches on
# a machine with cores to spare; on 2-4 cores it competes with the model's threads and loses
# (measured: 50 rows of a JSON schema, 2 busy cores, 52 ms batched vs 45 ms one by one).
BATCH_FILL_MIN_ROWS = 16
BATCH_FILL_MIN_CPUS = 8
# JSON may hold any whitespace between its tokens, but at most this many characters in one run
# (enough for "\n" plus two levels of indentation): unbounded, a sampled model can pad forever
# instead of finishing the object. outlines' default, "[ ]?", is stricter still.
JSON_MAX_WHITESPACE = 6
_JSON_OPTIONS = dict(any_whitespace=True, max_whitespace_cnt=JSON_MAX_WHITESPACE)
# xgrammar (<= 0.2.8) writes a string with minLength/maxLength as a repeat of [^"\\\r\n]: raw
# control characters (tab, \x01...) pass, which makes invalid JSON (RFC 8259 wants them escaped).
# Its unbounded strings exclude \0-\x1f; the bounded ones are given the same class here.
_BOUNDED_STRING_CHAR = r'[^\"\\\r\n]'
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\]'


def json_schema_grammar(spec: str):
    """xgrammar's grammar of a JSON schema, with control characters kept out of every string."""
    import xgrammar as xgr

    ebnf = str(xgr.Grammar.from_json_schema(spec, **_JSON_OPTIONS))
    return xgr.Grammar.from_ebnf(ebnf.replace(_BOUNDED_STRING_CHAR, _JSON_STRING_CHAR))


def compiler_message(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    text = _CHECK_PREFIX.sub("", _CPP_PREFIX.sub("", text))
    return " ".join(text.split())


class XGrammarMatcher(GrammarMatcher):
    def __init__(self, matcher):
        self._matcher = matcher

    def accept_token(self, token_id: int) -> bool:
        return bool(self._matcher.accept_token(int(token_id)))

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def is_terminated(self) -> bool:
        return bool(self._matcher.is_terminated())

    def rollback(self, num_tokens: int) -> None:
        if num_tokens:
            self._matcher.rollback(num_tokens)

    def reset(self) -> None:
        self._matcher.reset()

    def copy(self) -> "XGrammarMatcher":
        return XGrammarMatcher(self._matcher.fork())


class XGrammarCompiled(CompiledGrammar):
    def __init__(self, compiled):
        self.compiled = compiled

    def new_matcher(self) -> XGrammarMatcher:
        import xgrammar as xgr
        return XGrammarMatcher(xgr.GrammarMatcher(self.compiled))


class XGrammarBackend(GrammarBackend):
    supports = frozenset(GRAMMAR_KINDS)

    def __init__(self, config: GrammarConfig):
        super().__init__(config)
        self._compiler = None
        self._lock = threading.Lock()
        self._batch = None
        if config.whitespace_pattern is not None:
            logger.warning("xgrammar takes no whitespace regex: --constrained-json-whitespace-pattern is "
                           "used by the outlines backend only (xgrammar allows runs of up to %d whitespace "
                           "characters between JSON tokens)", JSON_MAX_WHITESPACE)

    # -- checking and compiling ---------------------------------------------------------------
    def validate(self, kind: str, spec: str) -> None:
        import xgrammar as xgr

        builders = {"json_schema": lambda: json_schema_grammar(spec),
                    "regex": lambda: xgr.Grammar.from_regex(spec),
                    "ebnf": lambda: xgr.Grammar.from_ebnf(spec),
                    "structural_tag": lambda: xgr.Grammar.from_structural_tag(spec)}
        with _compiler_errors(kind):
            builders[_known(kind)]()

    def compile(self, kind: str, spec: str) -> XGrammarCompiled:
        compiler = self._get_compiler()
        compilers = {"json_schema": lambda s: compiler.compile_grammar(json_schema_grammar(s)),
                     "regex": compiler.compile_regex,
                     "ebnf": compiler.compile_grammar, "structural_tag": compiler.compile_structural_tag}
        with _compiler_errors(kind):
            return XGrammarCompiled(compilers[_known(kind)](spec))

    def _get_compiler(self):
        with self._lock:  # compiles may run on several worker threads
            if self._compiler is None:
                import xgrammar as xgr

                cfg = self.config
                if cfg.tokenizer_factory is None:
                    raise GrammarError("the xgrammar backend needs the tokenizer (started with --skip-tokenizer-init?)")
                info = xgr.TokenizerInfo.from_huggingface(
                    cfg.tokenizer_factory(), vocab_size=cfg.vocab_size,
                    stop_token_ids=list(cfg.eos_token_ids) or None)
                self._compiler = xgr.GrammarCompiler(info, max_threads=cfg.compile_threads)
            return self._compiler

    # -- masks ----------------------------------------------------------------------------------
    def fill_bitmasks(self, matchers: Sequence[GrammarMatcher], bitmask: torch.Tensor,
                      rows: Sequence[int]) -> None:
        if len(matchers) < BATCH_FILL_MIN_ROWS or (os.cpu_count() or 1) < BATCH_FILL_MIN_CPUS:
            return super().fill_bitmasks(matchers, bitmask, rows)
        import xgrammar as xgr

        if self._batch is None:
            self._batch = xgr.BatchGrammarMatcher()
        self._batch.batch_fill_next_token_bitmask([m._matcher for m in matchers], bitmask, list(rows))


def _known(kind: str) -> str:
    if kind not in GRAMMAR_KINDS:
        raise GrammarError(f"unknown grammar kind {kind!r}; valid: {', '.join(GRAMMAR_KINDS)}")
    return kind


@contextmanager
def _compiler_errors(kind: str) -> Iterator[None]:
    try:
        yield
    except GrammarError:
        raise
    except (RuntimeError, ValueError, TypeError) as exc:
        raise GrammarError(f"{kind}: {compiler_message(exc)}") from None
