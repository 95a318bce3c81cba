"""Shared pieces of the commands: the flag parser built from ServerArgs, error reporting."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Optional

from rich.console import Console
from rich.markup import escape

from kvyard.server_args import ServerArgs

err = Console(stderr=True)

SAMPLING_FLAGS = {
    "max_new_tokens": int, "temperature": float, "top_p": float, "top_k": int, "min_p": float,
    "frequency_penalty": float, "presence_penalty": float, "repetition_penalty": float,
    "min_new_tokens": int, "seed": int, "n": int,
}


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag on one line and exits 2. No prefix abbreviation:
    ``--model`` is SGLang's alias of ``--model-path``, never "ambiguous"."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def engine_parser(prog: str, description: str, groups: Optional[set[str]] = None) -> argparse.ArgumentParser:
    parser = OneLineParser(prog=prog, description=description,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ServerArgs.add_cli_args(parser, groups)
    return parser


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    for name, typ in SAMPLING_FLAGS.items():
        g.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--stop-token-ids", type=int, nargs="+", default=None)
    g.add_argument("--ignore-eos", action="store_true", default=None)
    g.add_argument("--sampling-params", default=None, help="JSON object of sampling parameters")


def sampling_params_from(ns: argparse.Namespace) -> dict:
    params = json.loads(ns.sampling_params) if ns.sampling_params else {}
    for name in list(SAMPLING_FLAGS) + ["stop", "stop_token_ids", "ignore_eos"]:
        value = getattr(ns, name, None)
        if value is not None:
            params[name] = value
    return params


def server_args_from(ns: argparse.Namespace) -> ServerArgs:
    return ServerArgs.from_cli_namespace(ns)


def run_reporting_errors(fn: Callable[[], int]) -> int:
    """Runs a command; a ValueError (bad flag value, bad model path) is one red line, exit 1."""
    try:
        return fn()
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError) as exc:
        # escaped: messages name things like "kvyard[diffusion]"; soft_wrap: one line, any width
        err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, markup=True, soft_wrap=True)
        return 1


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1
