"""Grammar backends: the plugin kind behind structured output (json_schema, regex, ebnf, structural_tag).

Lifecycle of one constrained request:
  1. API process: ``backend.validate(kind, spec)`` — cheap and tokenizer-free, so a bad schema,
     regex or grammar is a 400 carrying the compiler's message before anything is queued.
  2. Scheduler process, off the critical path (a worker thread): ``backend.compile(kind, spec)``
     -> CompiledGrammar, cached per (backend, kind, spec) by the GrammarManager.
  3. When the request is admitted: ``compiled.new_matcher()`` -> GrammarMatcher (per request).
  4. Every step that samples for the request: ``fill_bitmask`` writes the allowed tokens into its
     row of a packed int32 bitmask; after sampling ``accept_token(id)`` advances the matcher.
  5. The matcher terminates once it has accepted one of the end tokens (``eos_token_ids``) in an
     accepting state; the request then finishes with finish_reason "stop".

The packed bitmask is the one format both libraries speak: shape [B, ceil(V / 32)] int32 on the
CPU, bit (t % 32) of word (t // 32) set when token t is allowed. ``bitmask_to_bool`` unpacks it on
the device into the [B, V] bool ``SamplingBatchInfo.vocab_mask``.

Invariant: a matcher has accepted exactly the request's ``output_ids`` between steps, so it
survives a retraction unchanged (the request keeps its output and is prefilled again).
"""
from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional, Sequence

import torch

GRAMMAR_KINDS = ("json_schema", "regex", "ebnf", "structural_tag")
BITS_PER_WORD = 32


class GrammarError(ValueError):
    """The spec does not compile; the message is the compiler's, in one line."""


@dataclass(frozen=True)
class GrammarConfig:
    """What a backend may know about the model. ``tokenizer_factory`` returns the HF tokenizer;
    it is called at most once, on the first compile (the API process validates without it)."""
    vocab_size: int                                    # the model's logits width (>= tokenizer size)
    eos_token_ids: tuple[int, ...] = ()                # end tokens; a grammar ends with one of them
    tokenizer_factory: Optional[Callable[[], Any]] = field(default=None, compare=False)
    whitespace_pattern: Optional[str] = None           # regex for the whitespace between JSON tokens
    compile_threads: int = 1

    def __post_init__(self) -> None:
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {self.vocab_size}")
        if self.compile_threads < 1:
            raise ValueError(f"compile_threads must be >= 1, got {self.compile_threads}")


class GrammarMatcher(ABC):
    """Per-request parse state. Owned by one Req; used only on the scheduler thread."""

    @abstractmethod
    def accept_token(self, token_id: int) -> bool:
        """Advance by one token; False (state unchanged) when the grammar does not allow it."""

    @abstractmethod
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]`` ([B, W] int32, CPU, contiguous).
        Every bit of the row is written; tokens past the tokenizer's vocabulary are disallowed."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """True once an end token was accepted; no further token is allowed."""

    @abstractmethod
    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` accepted tokens."""

    @abstractmethod
    def reset(self) -> None:
        """Back to the initial state (nothing accepted)."""

    @abstractmethod
    def copy(self) -> "GrammarMatcher":
        """An independent matcher in the same state."""


class CompiledGrammar(ABC):
    """The immutable, shareable result of compiling one spec for one tokenizer."""

    @abstractmethod
    def new_matcher(self) -> GrammarMatcher:
        """A fresh matcher at the grammar's start."""


class GrammarBackend(ABC):
    """One grammar library. Built once per process from a GrammarConfig.

    ``supports`` is a class attribute so the core can list alternatives without importing the
    library; implementations import it lazily. ``compile`` may run on a worker thread; matchers
    and ``fill_bitmasks`` run on the scheduler thread only."""

    supports: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: GrammarConfig):
        self.config = config

    @abstractmethod
    def validate(self, kind: str, spec: str) -> None:
        """Cheap syntax/semantics check without the tokenizer; raises GrammarError."""

    @abstractmethod
    def compile(self, kind: str, spec: str) -> CompiledGrammar:
        """Compile for this tokenizer; raises GrammarError with the compiler's message."""

    def fill_bitmasks(self, matchers: Sequence[GrammarMatcher], bitmask: torch.Tensor,
                      rows: Sequence[int]) -> None:
        """Fill ``bitmask[rows[i]]`` from ``matchers[i]``; backends may batch this."""
        for matcher, row in zip(matchers, rows):
            matcher.fill_bitmask(bitmask, row)


# -- request fields --------------------------------------------------------------------------
def grammar_spec(params: Any) -> Optional[tuple[str, str]]:
    """(kind, spec) of a normalized SamplingParams, or None when it asks for no grammar.
    SamplingParams.verify guarantees at most one kind is set; dict specs are JSON text by now."""
    for kind in GRAMMAR_KINDS:
        spec = getattr(params, kind, None)
        if spec is not None:
            return kind, spec
    return None


# -- packed bitmasks ---------------------------------------------------------------------------
def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + BITS_PER_WORD - 1) // BITS_PER_WORD


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """[rows, W] int32 on the CPU with every token allowed (all bits set)."""
    return torch.full((rows, bitmask_width(vocab_size)), -1, dtype=torch.int32)


def bitmask_to_bool(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, W] int32 -> [B, V] bool, True = allowed. Runs wherever ``bitmask`` lives.

    One table lookup per byte (byte k of word w holds tokens 32w + 8k .. 32w + 8k + 7 on a
    little-endian machine): ~4x cheaper on the CPU than shifting every word 32 times."""
    table = _byte_bits(bitmask.device)
    per_byte = bitmask.contiguous().view(torch.uint8).view(-1)
    return table.index_select(0, per_byte.int()).view(bitmask.shape[0], -1)[:, :vocab_size]


_BYTE_BITS: dict[torch.device, torch.Tensor] = {}


def _byte_bits(device: torch.device) -> torch.Tensor:
    """[256, 8] bool: the bits of each byte value, least significant first (cached per device)."""
    if device not in _BYTE_BITS:
        if sys.byteorder != "little":
            raise RuntimeError("packed grammar bitmasks assume a little-endian machine")
        values = torch.arange(256, dtype=torch.int32)
        _BYTE_BITS[device] = ((values.unsqueeze(1) >> torch.arange(8, dtype=torch.int32)) & 1).bool().to(device)
    return _BYTE_BITS[device]


def bool_to_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """[B, V] bool -> [B, W] int32 (the inverse of bitmask_to_bool; backends that compute a
    boolean row, and tests, use it)."""
    rows, vocab = mask.shape
    padded = torch.zeros(rows, bitmask_width(vocab) * BITS_PER_WORD, dtype=torch.int64)
    padded[:, :vocab] = mask.to(torch.int64)
    weights = torch.ones(BITS_PER_WORD, dtype=torch.int64) << torch.arange(BITS_PER_WORD)
    words = (padded.view(rows, -1, BITS_PER_WORD) * weights).sum(-1)   # [B, W] in [0, 2**32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
