"""This rank's slice of one checkpoint entry: ``take(entry, dim, shard, name)``.

A checkpoint entry is a torch.Tensor, a ``kvyard.loader.LazyTensor`` (safetensors under tensor
parallelism: only the slice is read from the file) or a ``kvyard.loader.QuantizedTensor``
(GGUF blocks). Quantized blocks are sliced without dequantizing where the slice follows block
boundaries: along dim 0 (rows are independent) always, along dim 1 when the start and the size
are multiples of the block width; elsewhere the entry is dequantized, then sliced (logged once).

A shard that runs past the entry's end (the padded vocabulary's last rank) is zero-filled.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from kvyard.distributed import Shard
from kvyard.loader import LazyTensor

logger = logging.getLogger(__name__)
_warned: set[str] = set()


def take(entry: Any, dim: int, shard: Shard, name: str) -> Any:
    """entry's indices [shard.start, shard.start + shard.size) along ``dim``."""
    if shard.whole:
        return entry
    if entry.shape[dim] != shard.full:
        raise ValueError(f"{name}: checkpoint dim {dim} has {entry.shape[dim]} entries, the model "
                         f"splits {shard.full}")
    avail = max(0, min(shard.size, shard.full - shard.start))
    if isinstance(entry, (torch.Tensor, LazyTensor)):   # a LazyTensor reads only the slice
        part = entry.narrow(dim, shard.start, avail)
    elif hasattr(entry, "qtype"):
        part = _take_quantized(entry, dim, shard.start, avail, name)
    else:
        raise TypeError(f"{name}: cannot split a checkpoint entry of type {type(entry).__name__}")
    if avail < shard.size:
        part = _pad(part, dim, shard.size, name)
    return part


def _take_quantized(entry: Any, dim: int, start: int, size: int, name: str) -> Any:
    import gguf

    from kvyard.loader import QuantizedTensor

    rows, cols = entry.shape
    if dim == 0:
        return QuantizedTensor(entry.data[start:start + size], (size, cols), entry.qtype)
    block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(entry.qtype)]
    if start % block == 0 and size % block == 0:
        lo, n = start // block * block_bytes, size // block * block_bytes
        return QuantizedTensor(entry.data.reshape(rows, -1)[:, lo:lo + n], (rows, size), entry.qtype)
    kind = gguf.GGMLQuantizationType(entry.qtype).name
    if kind not in _warned:
        _warned.add(kind)
        logger.warning("%s: a %s slice of %d columns at %d does not follow its %d-wide blocks; "
                       "such weights are dequantized, then split", name, kind, size, start, block)
    return entry.dequantize().narrow(1, start, size)


def _pad(part: Any, dim: int, size: int, name: str) -> torch.Tensor:
    dense = part if isinstance(part, torch.Tensor) else part.dequantize()
    shape = list(dense.shape)
    shape[dim] = size - shape[dim]
    return torch.cat([dense, dense.new_zeros(shape)], dim=dim)
