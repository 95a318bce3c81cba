"""The constructors a program uses: gen, select, gen_int, gen_string, image and the role helpers.

They only build expressions (kvyard.lang.ir); nothing runs until a state executes them.
Arguments are checked here, so a bad one fails at the line that wrote it.
"""
from __future__ import annotations

import json
from typing import Any, Optional, Union

from kvyard.lang.choices import resolve_method
from kvyard.lang.errors import LangError
from kvyard.lang.ir import Expr, ExprList, Gen, Image, RoleBegin, RoleEnd, Select, anonymous_name, as_expr
from kvyard.lang.sampling import SamplingParams

# regexes of the typed gens (dtype=int / dtype=str)
REGEX_INT = r"[-+]?[0-9]+"
REGEX_STR = r"\"[^\"\n]*\""


def gen(name: Optional[str] = None, max_tokens: Optional[int] = None, min_tokens: Optional[int] = None,
        n: Optional[int] = None, stop: Union[str, list[str], None] = None, stop_token_ids: Optional[list[int]] = None,
        temperature: Optional[float] = None, top_p: Optional[float] = None, top_k: Optional[int] = None,
        min_p: Optional[float] = None, frequency_penalty: Optional[float] = None,
        presence_penalty: Optional[float] = None, ignore_eos: Optional[bool] = None,
        return_logprob: Optional[bool] = None, logprob_start_len: Optional[int] = None,
        top_logprobs_num: Optional[int] = None, return_text_in_logprobs: Optional[bool] = None,
        dtype: Optional[type] = None, choices: Optional[list[str]] = None, choices_method: Any = None,
        regex: Optional[str] = None, json_schema: Union[str, dict, None] = None) -> Expr:
    """Generate into variable ``name``; with ``choices`` it is a select."""
    if choices is not None:
        return select(name, choices, temperature=temperature or 0.0, choices_method=choices_method)
    if choices_method is not None:
        resolve_method(choices_method)  # an unknown method is an error even without choices
        raise LangError("choices_method: only meaningful with choices")
    _check_name(name)
    if dtype not in (None, int, str):
        raise LangError(f"dtype: must be int or str, got {dtype!r}")
    if regex is not None and (dtype is not None or json_schema is not None):
        raise LangError("regex: give one of regex, json_schema and dtype")
    if isinstance(json_schema, dict):
        json_schema = json.dumps(json_schema)
    if dtype is int:
        regex = REGEX_INT
    elif dtype is str:
        regex = REGEX_STR
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 0):
        raise LangError(f"max_tokens: must be an int >= 0, got {max_tokens!r}")
    params = SamplingParams(
        max_new_tokens=max_tokens, min_new_tokens=min_tokens, n=n, stop=stop, stop_token_ids=stop_token_ids,
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty, ignore_eos=ignore_eos, regex=regex, json_schema=json_schema,
        return_logprob=return_logprob, logprob_start_len=logprob_start_len, top_logprobs_num=top_logprobs_num,
        return_text_in_logprobs=return_text_in_logprobs)
    if n not in (None, 1):
        raise LangError("n: a gen produces one sample; use s.fork(n) for several")
    return Gen(name or anonymous_name("gen"), params, dtype, named=name is not None)


def gen_int(name: Optional[str] = None, **kwargs: Any) -> Expr:
    """An integer (digits, optional sign); the variable holds an int."""
    return gen(name, dtype=int, **kwargs)


def gen_string(name: Optional[str] = None, **kwargs: Any) -> Expr:
    """A double-quoted string on one line; the variable holds the text with its quotes."""
    return gen(name, dtype=str, **kwargs)


def select(name: Optional[str] = None, choices: Optional[list[str]] = None, temperature: float = 0.0,
           choices_method: Any = None) -> Expr:
    """Pick the most likely of ``choices`` given the text so far (see kvyard.lang.choices)."""
    _check_name(name)
    method = resolve_method(choices_method)
    if not isinstance(choices, (list, tuple)) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise LangError("choices: must be a non-empty list of non-empty strings")
    if temperature != 0.0:
        raise LangError("temperature: select picks by likelihood; only temperature 0 is supported")
    return Select(name or anonymous_name("select"), list(choices), temperature, method, named=name is not None)


def image(path: str) -> Expr:
    """An image input; a backend whose model has no vision support refuses it when it runs."""
    if not isinstance(path, str) or not path:
        raise LangError("image: give a file path or URL")
    return Image(path)


def _check_name(name: Optional[str]) -> None:
    if name is not None and (not isinstance(name, str) or not name):
        raise LangError(f"name: a variable name must be a non-empty string, got {name!r}")


# -- roles ---------------------------------------------------------------------------------
def _role(role: str, expr: Any = None) -> Expr:
    if expr is None:
        return ExprList([RoleBegin(role), RoleEnd(role)])
    return ExprList([RoleBegin(role), as_expr(expr), RoleEnd(role)])


def system(expr: Any = None) -> Expr:
    return _role("system", expr)


def user(expr: Any = None) -> Expr:
    return _role("user", expr)


def assistant(expr: Any = None) -> Expr:
    return _role("assistant", expr)


def system_begin() -> Expr:
    return RoleBegin("system")


def system_end() -> Expr:
    return RoleEnd("system")


def user_begin() -> Expr:
    return RoleBegin("user")


def user_end() -> Expr:
    return RoleEnd("user")


def assistant_begin() -> Expr:
    return RoleBegin("assistant")


def assistant_end() -> Expr:
    return RoleEnd("assistant")
