"""Entry point of gptq: GPTQ 4-bit checkpoints (quant_method "gptq"; AutoGPTQ / GPTQModel)."""
from kvyard.hookspecs import hookimpl


@hookimpl
def register_quantization_methods(register):
    register("gptq", "kvyard_plugins.quantization.gptq_method:GPTQQuantization")
