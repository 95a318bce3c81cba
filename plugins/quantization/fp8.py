"""Entry point of the fp8 quantization methods: fp8 (online, and checkpoints that declare
quant_method "fp8") and w8a8_fp8 (per-channel fp8 weights with per-token activations)."""
from kvyard.hookspecs import hookimpl


@hookimpl
def register_quantization_methods(register):
    register("fp8", "kvyard_plugins.quantization.fp8_method:Fp8Quantization")
    register("w8a8_fp8", "kvyard_plugins.quantization.fp8_method:W8A8Fp8Quantization")
