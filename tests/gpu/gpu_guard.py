"""The condition every tests/gpu module starts with: a CUDA device and, for modules that compile
Triton kernels, no CPU interpreter (TRITON_INTERPRET=1 would run them as Python). Called at
import, ``require_gpu()`` skips the whole module otherwise (reported as skipped, as CI shows)."""
from __future__ import annotations

import os

import pytest
import torch


def require_gpu(triton: bool = True) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device", allow_module_level=True)
    if triton and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set: these tests compile for the GPU", allow_module_level=True)
