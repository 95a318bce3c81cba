"""Built-in load formats: safetensors, pt, gguf, dummy.

This is the entry-point module (``load_formats`` in pyproject.toml). Factories are lazy
"module:Class" strings, so e.g. the gguf library is imported only when a GGUF file is loaded.
"""
from kvyard.hookspecs import hookimpl

_LOADERS = {
    "safetensors": "kvyard_plugins.loaders.safetensors_loader:SafetensorsLoader",
    "pt": "kvyard_plugins.loaders.pt_loader:PtLoader",
    "gguf": "kvyard_plugins.loaders.gguf_loader:GGUFLoader",
    "dummy": "kvyard_plugins.loaders.dummy_loader:DummyLoader",
}


@hookimpl
def register_load_formats(register):
    for name, factory in _LOADERS.items():
        register(name, factory)
