"""Entry-point module of the `moe` model plugin: Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE.

The implementation (moe_model.py, on kvyard.layers.moe) is imported only when one of these
architectures is loaded.
"""
from kvyard.hookspecs import hookimpl

_IMPL = "kvyard_plugins.models.moe_model"
ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM")


@hookimpl
def register_model_architectures(register):
    for arch in ARCHITECTURES:
        register(arch, f"{_IMPL}:{arch}")
