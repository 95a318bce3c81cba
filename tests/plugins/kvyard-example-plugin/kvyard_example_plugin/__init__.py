"""Entry-point module: registers one attention backend, imported lazily when selected."""
from kvyard.hookspecs import hookimpl


@hookimpl
def register_attention_backends(register):
    register("example_dense", "kvyard_example_plugin.backend:DenseAttentionBackend")
