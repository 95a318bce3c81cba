"""The expressions a program appends to its state with ``s += ...``.

An expression is immutable; ``a + b`` of expressions (or strings) is an ``ExprList`` that the
executor runs left to right. Invariant: every gen/select carries its variable name (given or
generated), so the executor can record its value and meta info under one key.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from kvyard.lang.sampling import SamplingParams

_anon = itertools.count()


def anonymous_name(kind: str) -> str:
    return f"_{kind}_{next(_anon)}"


class Expr:
    """Base of every expression; supports ``+`` with strings and other expressions."""

    def __add__(self, other: Any) -> "ExprList":
        return ExprList([self, as_expr(other)])

    def __radd__(self, other: Any) -> "ExprList":
        return ExprList([as_expr(other), self])


@dataclass(frozen=True, eq=False)
class Text(Expr):
    value: str


@dataclass(frozen=True, eq=False)
class ExprList(Expr):
    items: list

    def __post_init__(self):
        flat = []
        for item in self.items:
            flat += item.items if isinstance(item, ExprList) else [item]
        object.__setattr__(self, "items", flat)


@dataclass(frozen=True, eq=False)
class Gen(Expr):
    """Generate text into variable ``name``; ``dtype`` int|str constrains and converts it."""
    name: str
    params: SamplingParams = field(default_factory=SamplingParams)
    dtype: Optional[type] = None
    named: bool = True  # False: the user gave no name (an anonymous variable)


@dataclass(frozen=True, eq=False)
class Select(Expr):
    """Pick one of ``choices`` by likelihood (choices method) into variable ``name``."""
    name: str
    choices: Sequence[str]
    temperature: float = 0.0
    choices_method: Any = None  # a ChoicesMethod; None: the default
    named: bool = True


@dataclass(frozen=True, eq=False)
class RoleBegin(Expr):
    role: str


@dataclass(frozen=True, eq=False)
class RoleEnd(Expr):
    role: str


@dataclass(frozen=True, eq=False)
class Image(Expr):
    path: str


@dataclass(frozen=True, eq=False)
class CachePrefix(Expr):
    """Internal: send the state's text so far once, generating nothing (the prefix hint)."""


def as_expr(value: Any) -> Expr:
    if isinstance(value, Expr):
        return value
    if isinstance(value, str):
        return Text(value)
    if isinstance(value, (int, float)):
        return Text(str(value))
    raise TypeError(f"cannot append a {type(value).__name__} to a program state (use str, gen, select, ...)")
