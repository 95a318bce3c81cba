"""Entry-point module of the `triton` attention plugin (kvyard's Triton kernels; CUDA, or the
CPU interpreter with TRITON_INTERPRET=1). Importing triton is left to the factory."""
from kvyard.hookspecs import hookimpl


@hookimpl
def register_attention_backends(register):
    register("triton", "kvyard_plugins.attention.triton_backend:TritonAttnBackend")
