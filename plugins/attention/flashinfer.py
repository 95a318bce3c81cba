"""Entry-point module of the `flashinfer` attention plugin (the flashinfer-python library's paged
prefill/decode kernels; CUDA only). Importing flashinfer is left to the backend's constructor, so
listing or selecting other plugins never touches it."""
from kvyard.hookspecs import hookimpl


@hookimpl
def register_attention_backends(register):
    register("flashinfer", "kvyard_plugins.attention.flashinfer_backend:FlashInferBackend")
