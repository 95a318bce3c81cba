"""Process-wide settings of kvyard.lang: the default backend set by set_default_backend."""
from __future__ import annotations

default_backend = None


def set_default_backend(backend) -> None:
    global default_backend
    default_backend = backend
