"""Entry-point module of the `gemma` model plugin: Gemma 2 and Gemma 3 (text) decoders.

The implementation (gemma_model.py) is imported only when one of these architectures is loaded.
"""
from kvyard.hookspecs import hookimpl

ARCHITECTURES = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")


@hookimpl
def register_model_architectures(register):
    for arch in ARCHITECTURES:
        register(arch, f"kvyard_plugins.models.gemma_model:{arch}")
