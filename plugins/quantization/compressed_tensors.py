"""Entry point of compressed-tensors: checkpoints llm-compressor writes
(quant_method "compressed-tensors": fp8, int8 w8a8, w4a16 pack-quantized)."""
from kvyard.hookspecs import hookimpl


@hookimpl
def register_quantization_methods(register):
    register("compressed-tensors",
             "kvyard_plugins.quantization.compressed_tensors_method:CompressedTensorsQuantization")
