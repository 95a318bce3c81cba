"""The dense causal attention that the attention-backend tests (tests/unit/attention, tests/gpu)
compare every backend with: float64 on the CPU, so its own rounding is far below any bound."""
from __future__ import annotations

import torch


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int) -> torch.Tensor:
    """q [n, H, D] at positions prefix.., k / v [prefix + n, Hkv, D] (H a multiple of Hkv: query
    head h reads kv head h // (H / Hkv)) -> [n, H * D] float64, softmax scale D ** -0.5."""
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    n, heads, dim = q.shape
    group = heads // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * dim ** -0.5
    allowed = torch.arange(k.shape[0])[None, :] <= torch.arange(prefix, prefix + n)[:, None]
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v).reshape(n, -1)
