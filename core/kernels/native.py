"""Handles on native kernel descriptors (core/kernels/csrc/kvyard_native.h) for the C++ decode step.

A plugin that can run one of its kernels without the dispatcher (``LinearMethod.lower_native``,
``AttentionBackend.lower_decode_native``) returns a ``NativeKernel``: the addresses of its
descriptors and the tensors they point into. Whoever holds the handle keeps the descriptors
valid; the C++ side only borrows the addresses.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class NativeKernel:
    """descriptors: addresses of kvyard_native_linear structs (one per output segment, outputs
    concatenated along the last dim) or of one kvyard_native_attention struct."""
    descriptors: tuple[int, ...]
    keep: tuple[torch.Tensor, ...]
