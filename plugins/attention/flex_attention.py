"""Entry-point module of the `flex_attention` attention plugin (torch FlexAttention with a block
mask built from the page table; CPU and CUDA)."""
from kvyard.hookspecs import hookimpl


@hookimpl
def register_attention_backends(register):
    register("flex_attention", "kvyard_plugins.attention.flex_attention_backend:FlexAttentionBackend")
