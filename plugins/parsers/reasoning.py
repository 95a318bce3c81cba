"""Entry point of the built-in reasoning parsers (group "kvyard", name "reasoning_parsers")."""
from kvyard.hookspecs import Register, hookimpl

_PARSERS = {
    "deepseek-r1": "kvyard_plugins.parsers.reasoning_impl:DeepSeekR1Parser",
    "qwen3": "kvyard_plugins.parsers.reasoning_impl:Qwen3Parser",
    "kimi": "kvyard_plugins.parsers.reasoning_impl:KimiParser",
}


@hookimpl
def register_reasoning_parsers(register: Register) -> None:
    for name, factory in _PARSERS.items():
        register(name, factory)
