"""Typer app. Commands that take engine flags (generate, serve, bench) parse them with the
argparse parser generated from ServerArgs, so every flag is checked at parse time and
`--help` is grouped by topic."""
from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="kvyard: LLM inference engine and server built from plugins.")
PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}
console = Console(stderr=True)


@app.command()
def version() -> None:
    """Print the kvyard version."""
    from kvyard import __version__
    print(f"kvyard {__version__}")


@app.command()
def plugins() -> None:
    """List every registered plugin: kind, name, distribution, version."""
    from kvyard.plugins import get_plugin_manager

    pm = get_plugin_manager()
    table = Table("kind", "name", "distribution", "version")
    for e in pm.all_entries():
        table.add_row(e.kind[:-1], e.name, e.distribution, e.version)
    out = Console()
    if not out.is_terminal:   # piped (scripts, tests): never cut a name to the default 80 columns
        out = Console(width=200)
    out.print(table)
    for msg in pm.broken:
        console.print(f"[yellow]warning:[/] {msg}")


@app.command(context_settings=PASSTHROUGH, add_help_option=False)
def generate(ctx: typer.Context) -> None:
    """Generate text for one prompt or a file of prompts (run with --help for every flag)."""
    from kvyard.cli.generate import run_generate
    from kvyard.utils import exit_without_teardown
    exit_without_teardown(run_generate(ctx.args))


@app.command(context_settings=PASSTHROUGH, add_help_option=False)
def serve(ctx: typer.Context) -> None:
    """Start the OpenAI-compatible and native HTTP server (run with --help for every flag)."""
    from kvyard.cli.serve import run_serve
    sys.exit(run_serve(ctx.args))


@app.command(context_settings=PASSTHROUGH, add_help_option=False)
def router(ctx: typer.Context) -> None:
    """Route requests across `kvyard serve` workers: cache-aware, round-robin, ... (--help for flags)."""
    from kvyard.cli.router import run_router
    sys.exit(run_router(ctx.args))


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: offline, one-batch, serving, accuracy.")
app.add_typer(bench_app, name="bench")


@bench_app.command("offline", context_settings=PASSTHROUGH, add_help_option=False)
def bench_offline(ctx: typer.Context) -> None:
    """Throughput of the full engine on N prompts (run with --help for every flag)."""
    from kvyard.bench.offline import main as run
    sys.exit(run(ctx.args))


@bench_app.command("one-batch", context_settings=PASSTHROUGH, add_help_option=False)
def bench_one_batch(ctx: typer.Context) -> None:
    """Prefill and decode latency of one static batch (run with --help for every flag)."""
    from kvyard.bench.one_batch import main as run
    sys.exit(run(ctx.args))


@bench_app.command("serving", context_settings=PASSTHROUGH, add_help_option=False)
def bench_serving(ctx: typer.Context) -> None:
    """Load an HTTP server with concurrent requests (run with --help for every flag)."""
    from kvyard.bench.serving import main as run
    sys.exit(run(ctx.args))


@bench_app.command("accuracy", context_settings=PASSTHROUGH, add_help_option=False)
def bench_accuracy(ctx: typer.Context) -> None:
    """Few-shot GSM8K/MMLU-style accuracy of a server on a local JSONL file (run with --help)."""
    from kvyard.bench.accuracy import main as run
    sys.exit(run(ctx.args))


def main() -> None:
    app()
