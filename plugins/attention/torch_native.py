"""Entry-point module of the `torch_native` attention plugin (pure PyTorch, CPU and CUDA)."""
from kvyard.hookspecs import hookimpl


@hookimpl
def register_attention_backends(register):
    register("torch_native", "kvyard_plugins.attention.torch_native_backend:TorchNativeBackend")
