"""How the attention kernels multiply: ``fp32_dot(dtype)`` is the FP32_DOT kernel switch.

True   q/k/v are cast to float32 and tl.dot runs as true IEEE float32 (not tf32). Taken for float32
       models, so they keep float32 accuracy on a GPU, and always under the CPU interpreter,
       whose bfloat16 arithmetic is not IEEE (it holds bf16 as raw uint16 words).
False  bf16/fp16 operands stay narrow so the tensor cores take them; accumulation is float32.
"""
from __future__ import annotations

import os

import torch


def fp32_dot(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or os.environ.get("TRITON_INTERPRET", "0") == "1"
