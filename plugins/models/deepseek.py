"""Entry-point module of the `deepseek` model plugin: DeepSeek-V2 and V3 (multi-head latent
attention; declares the "mla" KV layout). deepseek_model.py is imported only when loaded."""
from kvyard.hookspecs import hookimpl

_IMPL = "kvyard_plugins.models.deepseek_model"
ARCHITECTURES = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")


@hookimpl
def register_model_architectures(register):
    for arch in ARCHITECTURES:
        register(arch, f"{_IMPL}:{arch}")
