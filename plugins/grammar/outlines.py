"""Entry-point module of the `outlines` grammar backend (regex and JSON schema via outlines_core)."""
from kvyard.hookspecs import hookimpl


@hookimpl
def register_grammar_backends(register):
    register("outlines", "kvyard_plugins.grammar.outlines_backend:OutlinesBackend")
