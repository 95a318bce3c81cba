"""tests/unit mirrors the packages of core/ (one folder per concern); the helper modules the
folders share (forward_harness, tiny_tokenizer, hf_reference, quant_*, lang_fake_backend,
fake_flashinfer) stay here, importable from every folder."""
from __future__ import annotations

import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
