"""Finding the constant text a program starts with, for the prefix hint of run_batch.

The body runs once on a TracingState with placeholder arguments. Expressions are collected
while they are constant (text and role markers); the first that is not — a gen, a select, an
argument, a read of a variable, a fork, anything the placeholders cannot do — ends the trace.
The collected expressions are then rendered with the backend's chat template, offline.
"""
from __future__ import annotations

from typing import Any

from kvyard.lang.backend.base import Backend
from kvyard.lang.ir import Expr, ExprList, RoleBegin, RoleEnd, Text, as_expr
from kvyard.lang.sampling import DEFAULT_RUN_PARAMS


class _StopTrace(Exception):
    pass


class _ArgExpr(Expr):
    """A program argument inside an expression: not constant."""


class _Placeholder:
    """Stands for an argument; any use other than concatenation ends the trace."""

    def __radd__(self, other: Any) -> Expr:
        return as_expr(other) + _ArgExpr()

    def __add__(self, other: Any) -> Expr:
        return _ArgExpr() + as_expr(other)

    def _stop(self, *args: Any, **kwargs: Any):
        raise _StopTrace

    __getattr__ = __str__ = __format__ = __iter__ = __len__ = __bool__ = __getitem__ = _stop
    __eq__ = __lt__ = __gt__ = __contains__ = __int__ = __float__ = __mul__ = __rmul__ = _stop
    __hash__ = None


class TracingState:
    def __init__(self):
        self.constant: list[Expr] = []

    def __iadd__(self, other: Any) -> "TracingState":
        expr = other if isinstance(other, Expr) else as_expr(other)
        for item in expr.items if isinstance(expr, ExprList) else [expr]:
            if not isinstance(item, (Text, RoleBegin, RoleEnd)):
                raise _StopTrace
            self.constant.append(item)
        return self

    def __getattr__(self, name: str):
        raise _StopTrace

    def __getitem__(self, name: str):
        raise _StopTrace


class _OfflineBackend(Backend):
    name = "tracer"

    def __init__(self, template):
        self.template = template

    def get_chat_template(self):
        return self.template


def trace_prefix(program, backend: Backend) -> str:
    """The text every run of ``program`` starts with ("" when none is known)."""
    from kvyard.lang.interpreter import StreamExecutor

    state = TracingState()
    try:
        program.func(state, **{name: _Placeholder() for name in program.arg_names})
    except Exception:  # noqa: BLE001 — _StopTrace or whatever the placeholders broke: the trace ends
        pass
    if not state.constant:
        return ""
    executor = StreamExecutor(_OfflineBackend(backend.get_chat_template()), DEFAULT_RUN_PARAMS)
    for expr in state.constant:
        executor._execute(expr)
    return executor.text
