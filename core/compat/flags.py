"""Every SGLang launch flag parses on kvyard's commands.

A flag kvyard defines under the same name (a ServerArgs field) is kvyard's own. For the others,
``add_sglang_flags`` registers each name with its SGLang arity so the command line parses, then
``refused_flags`` names the ones given: the command stops with "--X is not supported by kvyard"
(exit code non-zero) instead of "unrecognized arguments" — except where the value asks for what
kvyard does anyway (``NEUTRAL``: one GPU, the model's KV dtype, the torch sampler, ...). SGLang's
other spellings of kvyard's flags (``--model``, ``--tp``) are aliases of kvyard's flags.

Invariant: a flag that ServerArgs defines is never registered here, so a feature added to
ServerArgs later takes its SGLang flag over without an edit here.
"""
from __future__ import annotations

import argparse
from typing import Iterable

from kvyard.compat import sglang_flag_names as names

DEST_PREFIX = "sglang_refused__"

# SGLang flags whose given value is what kvyard does anyway: accepted with that value only
NEUTRAL = {
    "dp-size": ("1",), "ep-size": ("1",), "cpu-offload-gb": ("0",),
    "kv-cache-dtype": ("auto",), "tokenizer-backend": ("huggingface",),
    "model-impl": ("auto",), "tokenizer-worker-num": ("1",), "detokenizer-worker-num": ("1",),
}


def _arity(name: str) -> dict:
    if name in _SWITCH:
        return {"action": "store_true"}
    if name in _BOOL_OPTIONAL:
        return {"action": argparse.BooleanOptionalAction}
    if name in _MULTI:
        return {"nargs": "*"}
    if name in _OPTIONAL_VALUE:
        return {"nargs": "?", "const": "true"}
    return {}


_SWITCH, _BOOL_OPTIONAL = frozenset(names.SWITCH), frozenset(names.BOOL_OPTIONAL)
_MULTI, _OPTIONAL_VALUE = frozenset(names.MULTI), frozenset(names.OPTIONAL_VALUE)
ALL = tuple(names.VALUE + names.MULTI + names.SWITCH + names.BOOL_OPTIONAL + names.OPTIONAL_VALUE)


def add_sglang_flags(parser: argparse.ArgumentParser, own: Iterable[str]) -> None:
    """Registers SGLang's flags that ServerArgs lacks (``own``: its field names), and SGLang's
    aliases of flags the parser has."""
    own = set(own)
    parser.epilog = (parser.epilog or "") + ("Every other launch flag of SGLang parses and is refused by name "
                                             "(see docs/sglang-compat.md).")
    group = parser.add_argument_group("SGLang flags kvyard does not support (accepted by name, then refused)")
    for name in ALL:
        if name.replace("-", "_") in own:
            continue
        spellings = ["--" + name] + ["--" + a for a, p in names.ALIASES.items() if p == name]
        spellings = [s for s in spellings if s not in parser._option_string_actions]
        if spellings:
            group.add_argument(*spellings, dest=DEST_PREFIX + name.replace("-", "_"),
                               default=argparse.SUPPRESS, help=argparse.SUPPRESS, **_arity(name))
    for alias, primary in names.ALIASES.items():
        target = parser._option_string_actions.get("--" + primary)
        if "--" + alias in parser._option_string_actions or target is None or \
                target.dest.startswith(DEST_PREFIX):
            continue
        _add_alias(parser, "--" + alias, target)


def _add_alias(parser: argparse.ArgumentParser, flag: str, target: argparse.Action) -> None:
    if isinstance(target, argparse._StoreTrueAction):
        parser.add_argument(flag, dest=target.dest, action="store_true", default=argparse.SUPPRESS,
                            help=f"same as {target.option_strings[0]}")
        return
    parser.add_argument(flag, dest=target.dest, type=target.type, nargs=target.nargs, choices=target.choices,
                        default=argparse.SUPPRESS, help=f"same as {target.option_strings[0]}")


def refused_flags(ns: argparse.Namespace) -> list[str]:
    """The unsupported SGLang flags given on the command line (neutral values excepted)."""
    out = []
    for dest, value in vars(ns).items():
        if not dest.startswith(DEST_PREFIX):
            continue
        name = dest[len(DEST_PREFIX):].replace("_", "-")
        if str(value).lower() in NEUTRAL.get(name, ()):
            continue
        out.append("--" + name)
    return out


def strip(ns: argparse.Namespace) -> dict:
    """The namespace without the SGLang-only entries (after refused_flags said none is set)."""
    return {k: v for k, v in vars(ns).items() if not k.startswith(DEST_PREFIX)}


def refusal_message(flags: list[str]) -> str:
    listed = ", ".join(flags)
    return (f"{listed} {'is' if len(flags) == 1 else 'are'} not supported by kvyard "
            "(SGLang flags; see docs/sglang-compat.md)")


def engine_kwargs(kwargs: dict, own: Iterable[str]) -> dict:
    """kvyard.Engine(**kwargs) with SGLang's argument names: kvyard's own pass through, neutral
    SGLang values are dropped, other SGLang names raise the refusal; unknown names pass through
    (ServerArgs reports them)."""
    own, sglang = set(own), {n.replace("-", "_") for n in ALL}
    out, refused = {}, []
    for key, value in kwargs.items():
        if key in own or key not in sglang:
            out[key] = value
        elif str(value).lower() not in NEUTRAL.get(key.replace("_", "-"), ()) and value not in (None, False):
            refused.append(key)
    if refused:
        raise ValueError(refusal_message(refused))
    return out
