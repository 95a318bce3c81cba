"""Entry-point module of the `xgrammar` grammar backend (the default for --grammar-backend)."""
from kvyard.hookspecs import hookimpl


@hookimpl
def register_grammar_backends(register):
    register("xgrammar", "kvyard_plugins.grammar.xgrammar_backend:XGrammarBackend")
