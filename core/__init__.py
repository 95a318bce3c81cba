"""kvyard: an LLM inference engine and server built as a plugin framework."""
from kvyard.version import __version__

__all__ = ["__version__"]
