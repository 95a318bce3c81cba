"""Entry point of the "gguf" quantization method (kept-quantized GGUF weights on the CPU).

The factory is a lazy string: the method module, and the kernels it compiles at first use, load
only when --quantization gguf (or a GGUF model with the auto choice) picks it.
"""
from kvyard.hookspecs import hookimpl


@hookimpl
def register_quantization_methods(register):
    register("gguf", "kvyard_plugins.quantization.gguf_method:GGUFQuantization")
