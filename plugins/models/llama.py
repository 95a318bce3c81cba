"""Entry-point module of the `llama` model plugin: the Llama-family decoders share one graph.

Llama, Mistral and Qwen2 are llama_model.py; Qwen3 (per-head q/k norm) and Phi-3 (fused
checkpoint projections, LongRoPE) are small variants of it in qwen3_model.py and phi3_model.py.
SmolLM / SmolLM2 checkpoints declare "LlamaForCausalLM". Implementations are imported only when
one of these architectures is loaded.
"""
from kvyard.hookspecs import hookimpl

_PKG = "kvyard_plugins.models"
ARCHITECTURES = {
    "LlamaForCausalLM": "llama_model", "MistralForCausalLM": "llama_model",
    "Qwen2ForCausalLM": "llama_model", "Qwen3ForCausalLM": "qwen3_model",
    "Phi3ForCausalLM": "phi3_model",
    # reward / classification heads on the same decoders (served as embedding models)
    "LlamaForSequenceClassification": "llama_model", "Qwen2ForSequenceClassification": "llama_model",
}


@hookimpl
def register_model_architectures(register):
    for arch, module in ARCHITECTURES.items():
        register(arch, f"{_PKG}.{module}:{arch}")
