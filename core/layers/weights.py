"""Checkpoint-tensor helpers shared by the model layers."""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

import torch

logger = logging.getLogger(__name__)


def as_dense(weight: Any, name: str) -> torch.Tensor:
    """A plain tensor from a checkpoint entry: torch.Tensor, or anything with ``dequantize()``
    (kvyard.loader.QuantizedTensor). ``name`` is the checkpoint name, for the error message."""
    if isinstance(weight, torch.Tensor):
        return weight
    if hasattr(weight, "dequantize"):
        return weight.dequantize()
    raise TypeError(f"{name}: cannot load a checkpoint entry of type {type(weight).__name__}")


def copy_checked(param: torch.Tensor, weight: Any, name: str) -> None:
    """Copies a checkpoint entry into ``param`` (casting dtype/device); a shape mismatch is an
    error naming the checkpoint entry."""
    dense = as_dense(weight, name)
    if tuple(dense.shape) != tuple(param.shape):
        raise ValueError(f"{name}: checkpoint shape {tuple(dense.shape)} does not match "
                         f"the model's {tuple(param.shape)}")
    param.data.copy_(dense)


def load_named(targets: dict[str, Callable[[Any], None]], weights: Iterable[tuple[str, Any]],
               also_loaded: Callable[[set[str]], set[str]] = lambda loaded: set()) -> None:
    """Feeds checkpoint (name, tensor) pairs to ``targets`` (HF name -> the call that loads it).
    Unknown names (rotary inv_freq, ...) are skipped; a target never fed is an error naming it.
    ``also_loaded(loaded)`` names targets filled some other way (e.g. a lm_head tied to the
    embedding)."""
    loaded: set[str] = set()
    for name, tensor in weights:
        load = targets.get(name)
        if load is None:
            logger.debug("skipping checkpoint entry %s", name)
            continue
        load(tensor)
        loaded.add(name)
    missing = sorted(set(targets) - loaded - also_loaded(loaded))
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise ValueError(f"checkpoint is missing weights: {shown}")
