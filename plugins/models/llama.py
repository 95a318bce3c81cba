"""Entry-point module of the `llama` model plugin: Llama, Mistral and Qwen2 share one graph.

SmolLM / SmolLM2 checkpoints declare "LlamaForCausalLM". The implementation lives in
llama_model.py and is imported only when one of these architectures is loaded.
"""
from kvyard.hookspecs import hookimpl

_IMPL = "kvyard_plugins.models.llama_model"
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@hookimpl
def register_model_architectures(register):
    for arch in ARCHITECTURES:
        register(arch, f"{_IMPL}:{arch}")
