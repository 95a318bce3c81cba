"""Entry point of w8a8_int8: int8 weights (per channel) x int8 activations (per token)."""
from kvyard.hookspecs import hookimpl


@hookimpl
def register_quantization_methods(register):
    register("w8a8_int8", "kvyard_plugins.quantization.w8a8_int8_method:W8A8Int8Quantization")
