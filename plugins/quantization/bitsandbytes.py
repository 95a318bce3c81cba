"""Entry point of bitsandbytes: nf4 / int8 weights through the bitsandbytes library."""
from kvyard.hookspecs import hookimpl


@hookimpl
def register_quantization_methods(register):
    register("bitsandbytes", "kvyard_plugins.quantization.bitsandbytes_method:BitsAndBytesQuantization")
