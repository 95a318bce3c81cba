"""The `kvyard` command line (Typer): generate, serve, bench, plugins, version."""
from kvyard.cli.app import app, main

__all__ = ["app", "main"]
