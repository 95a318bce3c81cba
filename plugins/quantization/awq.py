"""Entry point of awq: AutoAWQ 4-bit GEMM checkpoints (quant_method "awq")."""
from kvyard.hookspecs import hookimpl


@hookimpl
def register_quantization_methods(register):
    register("awq", "kvyard_plugins.quantization.awq_method:AWQQuantization")
