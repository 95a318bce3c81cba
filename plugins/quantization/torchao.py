"""Entry point of torchao: online quantization with a torchao recipe (--torchao-config)."""
from kvyard.hookspecs import hookimpl


@hookimpl
def register_quantization_methods(register):
    register("torchao", "kvyard_plugins.quantization.torchao_method:TorchaoQuantization")
