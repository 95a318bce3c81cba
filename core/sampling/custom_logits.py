"""Applying the requests' custom logit processors (kvyard.logit_processor) to a batch's logits.

Rows are grouped by processor name; each processor sees only its rows ([N, V]) and their
``custom_params``; instances are built once per scheduler process and reused.
"""
from __future__ import annotations

import torch

_instances: dict[str, object] = {}


def processor(name: str):
    if name not in _instances:
        from kvyard.plugins import registry
        _instances[name] = registry("logit_processors").get(name)()
    return _instances[name]


def apply_logit_processors(logits: torch.Tensor, params: list) -> torch.Tensor:
    """logits [B, V] float32; params [B] SamplingParams. Returns the processed logits (a new
    tensor: the caller's logits stay the raw ones logprobs are computed from)."""
    groups: dict[str, list[int]] = {}
    for row, p in enumerate(params):
        if p.custom_logit_processor:
            groups.setdefault(p.custom_logit_processor, []).append(row)
    logits = logits.clone()
    for name, rows in groups.items():
        index = torch.tensor(rows, dtype=torch.int64, device=logits.device)
        out = processor(name)(logits[index], [params[r].custom_params or {} for r in rows])
        logits[index] = out
    return logits
