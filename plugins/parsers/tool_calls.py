"""Entry point of the built-in tool-call parsers (group "kvyard", name "tool_call_parsers")."""
from kvyard.hookspecs import Register, hookimpl

_PARSERS = {
    "llama3": "kvyard_plugins.parsers.llama3:Llama3Parser",
    "mistral": "kvyard_plugins.parsers.mistral:MistralParser",
    "qwen25": "kvyard_plugins.parsers.qwen25:Qwen25Parser",
    "hermes": "kvyard_plugins.parsers.qwen25:HermesParser",
    "deepseekv3": "kvyard_plugins.parsers.deepseekv3:DeepSeekV3Parser",
    "pythonic": "kvyard_plugins.parsers.pythonic:PythonicParser",
    "json": "kvyard_plugins.parsers.generic_json:GenericJsonParser",
}


@hookimpl
def register_tool_call_parsers(register: Register) -> None:
    for name, factory in _PARSERS.items():
        register(name, factory)
