"""Built-in speculative decoding algorithms (entry-point module: algorithms.py)."""
