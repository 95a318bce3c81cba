"""Backends of kvyard.lang: where a program's gen and select calls are served."""
