"""The plugin contract: one collector-style hook per kind.

Every hook receives ``register(name, factory)``. ``factory`` is either a callable that builds
the component or a lazy "package.module:Attribute" string, so heavy libraries (triton,
flashinfer, xgrammar) are imported only when the user picks that plugin. The core calls
``pm.hook.register_<kind>(register=...)`` once per kind and never imports a plugin itself.
"""
from __future__ import annotations

from typing import Callable, Union

import pluggy

PROJECT = "kvyard"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Factory = Union[str, Callable[..., object]]
Register = Callable[[str, Factory], None]


@hookspec
def register_attention_backends(register: Register) -> None:
    """Register AttentionBackend subclasses (core/attention/) by name."""


@hookspec
def register_quantization_methods(register: Register) -> None:
    """Register QuantizationMethod subclasses (core/quantization.py) by name."""


@hookspec
def register_model_architectures(register: Register) -> None:
    """Register model classes by HF architecture name (e.g. "LlamaForCausalLM")."""


@hookspec
def register_load_formats(register: Register) -> None:
    """Register WeightLoader subclasses (core/loader.py) by load-format name."""


@hookspec
def register_tool_call_parsers(register: Register) -> None:
    """Register ToolCallParser subclasses (core/parsers.py) by name."""


@hookspec
def register_reasoning_parsers(register: Register) -> None:
    """Register ReasoningParser subclasses (core/parsers.py) by name."""


@hookspec
def register_grammar_backends(register: Register) -> None:
    """Register GrammarBackend subclasses (core/grammar/) by name."""


@hookspec
def register_speculative_algorithms(register: Register) -> None:
    """Register SpeculativeAlgorithm subclasses (core/speculative.py) by name (NGRAM, STANDALONE, ...)."""


@hookspec
def register_diffusion_pipelines(register: Register) -> None:
    """Register DiffusionPipelineBackend subclasses (core/diffusion/pipeline.py) by name."""


@hookspec
def register_logit_processors(register: Register) -> None:
    """Register LogitProcessor subclasses (core/logit_processor.py) by name."""
