"""SamplingParams: what one request asks of the sampler and the stop checker.

Lifecycle (API process): ``from_dict`` (types) -> ``verify(vocab_size)`` (ranges) ->
``normalize(tokenizer)`` (canonical forms the scheduler relies on). The scheduler only ever sees
normalized params: ``stop`` is a list of str, ``stop_token_ids`` a set of int, ``logit_bias`` keys
are int, and greedy decoding is spelled ``top_k == 1`` (temperature 1.0), as in SGLang.
"""
from __future__ import annotations

import json
import numbers
from dataclasses import dataclass, fields
from typing import Any, Optional, Union

# Below this temperature a request is decoded greedily (argmax) instead of dividing by ~0.
GREEDY_TEMPERATURE_EPS = 1e-5
_GRAMMAR_FIELDS = ("json_schema", "regex", "ebnf", "structural_tag")
_PENALTY_RANGE = (-2.0, 2.0)
_REPETITION_PENALTY_MAX = 2.0


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    stop: Union[str, list[str], None] = None
    stop_token_ids: Union[list[int], set[int], None] = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1                      # -1 = off
    min_p: float = 0.0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    n: int = 1
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    seed: Optional[int] = None
    logit_bias: Optional[dict] = None    # token id (int or decimal str) -> additive bias
    no_stop_trim: bool = False
    json_schema: Union[str, dict, None] = None
    regex: Optional[str] = None
    ebnf: Optional[str] = None
    structural_tag: Union[str, dict, None] = None
    custom_params: Optional[dict] = None
    # thinking budget (kvyard.scheduler.thinking_budget): at most this many thinking tokens, then
    # the end marker is forced; the markers' token ids ([] start: the output starts inside)
    thinking_budget: Optional[int] = None
    thinking_start_ids: Optional[list[int]] = None
    thinking_end_ids: Optional[list[int]] = None
    custom_logit_processor: Optional[str] = None   # a registered logit processor's name (kvyard.logit_processor)
    # derived by normalize(): longest stop string in tokens, for the incremental detokenizer
    stop_str_max_len: int = 0

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "SamplingParams":
        """Build from a request's JSON object. A None value means "the default"."""
        if not isinstance(d, dict):
            raise ValueError(f"sampling parameters must be an object, got {type(d).__name__}")
        known = {f.name for f in fields(cls) if f.name not in _DERIVED}
        for key in d:
            if key not in known:
                raise ValueError(f"unknown sampling parameter '{key}'")
        params = cls(**{k: v for k, v in d.items() if v is not None})
        params.check_types()
        return params

    @property
    def is_greedy(self) -> bool:
        """True once normalized for greedy decoding (or when the user asked for top_k=1)."""
        return self.top_k == 1

    # -- validation -------------------------------------------------------------------------
    def check_types(self) -> None:
        """One-line ValueError naming the first field whose value has the wrong type.
        Every message in this module starts with the field's name (the API layer reports it)."""
        for name, kinds in _FIELD_TYPES.items():
            value = getattr(self, name)
            if value is None and name in _NULLABLE:
                continue
            if not _is_instance(value, kinds):
                expected = " or ".join(_TYPE_NAMES[k] for k in kinds)
                raise ValueError(f"{name} must be {expected}, got {type(value).__name__}")

    def verify(self, vocab_size: int) -> None:
        """Range checks; one-line ValueError naming the field. Call before normalize()."""
        self.check_types()
        self._verify_sampling()
        self._verify_lengths()
        self._verify_penalties()
        self._verify_stop(vocab_size)
        self._verify_logit_bias(vocab_size)
        self._verify_thinking(vocab_size)
        grammars = [name for name in _GRAMMAR_FIELDS if getattr(self, name) is not None]
        if len(grammars) > 1:
            raise ValueError(f"{grammars[-1]}: only one of {'/'.join(_GRAMMAR_FIELDS)} may be set "
                             f"(got {', '.join(grammars)})")

    def _verify_sampling(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")

    def _verify_lengths(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) must be <= "
                             f"max_new_tokens ({self.max_new_tokens})")

    def _verify_penalties(self) -> None:
        low, high = _PENALTY_RANGE
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not low <= value <= high:
                raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {value}")
        if not 0 < self.repetition_penalty <= _REPETITION_PENALTY_MAX:
            raise ValueError(f"repetition_penalty must be in (0, {_REPETITION_PENALTY_MAX:g}], "
                             f"got {self.repetition_penalty}")

    def _verify_stop(self, vocab_size: int) -> None:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if any(not isinstance(s, str) for s in stops):
            raise ValueError("stop must be a string or a list of strings")
        for token_id in self.stop_token_ids or ():
            if not _is_int(token_id):
                raise ValueError(f"stop_token_ids must be integers, got {token_id!r}")
            if not 0 <= token_id < vocab_size:
                raise ValueError(f"stop_token_ids entry {token_id} is not a token id "
                                 f"(vocab size {vocab_size})")

    def _verify_logit_bias(self, vocab_size: int) -> None:
        for key, value in (self.logit_bias or {}).items():
            token_id = _token_id_of(key)
            if token_id is None or not 0 <= token_id < vocab_size:
                raise ValueError(f"logit_bias key {key!r} is not a token id (vocab size {vocab_size})")
            if not _is_number(value):
                raise ValueError(f"logit_bias value for token {key!r} must be a number, got {value!r}")

    def _verify_thinking(self, vocab_size: int) -> None:
        if self.thinking_budget is None:
            return
        if self.thinking_budget < 0:
            raise ValueError(f"thinking_budget must be >= 0, got {self.thinking_budget}")
        if not self.thinking_end_ids:
            raise ValueError("thinking_end_ids: required with thinking_budget (the end marker's token ids)")
        for name in ("thinking_start_ids", "thinking_end_ids"):
            for token_id in getattr(self, name) or ():
                if not _is_int(token_id) or not 0 <= token_id < vocab_size:
                    raise ValueError(f"{name} entry {token_id!r} is not a token id (vocab size {vocab_size})")

    # -- canonical form ---------------------------------------------------------------------
    def normalize(self, tokenizer: Any = None) -> "SamplingParams":
        """Put the params in the form the scheduler relies on (see module docstring)."""
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        if self.temperature < GREEDY_TEMPERATURE_EPS:
            self.temperature, self.top_k = 1.0, 1
        self.stop_token_ids = set(self.stop_token_ids or ())
        self.stop_str_max_len = max((_token_len(s, tokenizer) for s in self.stop), default=0)
        if self.logit_bias is not None:
            self.logit_bias = {_token_id_of(k): float(v) for k, v in self.logit_bias.items()}
        for name in ("json_schema", "structural_tag"):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, json.dumps(getattr(self, name)))
        return self


def _token_len(text: str, tokenizer: Any) -> int:
    if tokenizer is None:
        return len(text)  # one token never spans less than one character: an upper bound
    return len(tokenizer.encode(text, add_special_tokens=False))


def _token_id_of(key: Any) -> Optional[int]:
    """A logit_bias key as an int token id, or None when it is not one ("12" and 12 are)."""
    if _is_int(key):
        return key
    if isinstance(key, str) and key.strip().lstrip("-").isdigit():
        return int(key)
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_instance(value: Any, kinds: tuple) -> bool:
    return any(_CHECKS[k](value) for k in kinds)


_CHECKS = {
    "int": _is_int,
    "number": _is_number,
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "list": lambda v: isinstance(v, (list, tuple, set)),
    "dict": lambda v: isinstance(v, dict),
}
_TYPE_NAMES = {"int": "an integer", "number": "a number", "bool": "a boolean", "str": "a string",
               "list": "a list", "dict": "an object"}
_FIELD_TYPES = {
    "max_new_tokens": ("int",), "stop": ("str", "list"), "stop_token_ids": ("list",),
    "temperature": ("number",), "top_p": ("number",), "top_k": ("int",), "min_p": ("number",),
    "ignore_eos": ("bool",), "skip_special_tokens": ("bool",),
    "spaces_between_special_tokens": ("bool",), "n": ("int",),
    "frequency_penalty": ("number",), "presence_penalty": ("number",),
    "repetition_penalty": ("number",), "min_new_tokens": ("int",), "seed": ("int",),
    "logit_bias": ("dict",), "no_stop_trim": ("bool",), "json_schema": ("str", "dict"),
    "regex": ("str",), "ebnf": ("str",), "structural_tag": ("str", "dict"),
    "custom_params": ("dict",), "thinking_budget": ("int",), "thinking_start_ids": ("list",),
    "thinking_end_ids": ("list",), "custom_logit_processor": ("str",),
}
_NULLABLE = {"stop", "stop_token_ids", "seed", "logit_bias", "json_schema", "regex", "ebnf",
             "structural_tag", "custom_params", "thinking_budget", "thinking_start_ids", "thinking_end_ids",
             "custom_logit_processor"}
_DERIVED = {"stop_str_max_len"}
