"""Rotary position embedding (neox / rotate-half layout) with a precomputed cos/sin cache.

Supported ``rope_type``: "default", "linear", "llama3", "yarn", "dynamic", "longrope". The frequencies follow
the transformers definitions, so float32 results match HF. "dynamic" (NTK) only rescales once a
sequence outgrows max_position_embeddings; the cache stops there, so within it this is the
default rope, exactly as HF computes it (the engine's context length must not exceed it).
"longrope" (Phi-3) rotates positions below original_max_position_embeddings with the short
factors and later ones with the long factors; HF switches every position of a sequence to the
long factors once it outgrows that length, so the two agree for sequences up to it. Models whose
layer types use different rope settings (Gemma 3: local vs global base) pass ``layer_type`` to
``rope_config_from_hf`` and keep one RotaryEmbedding per type. The cache covers positions
[0, max_position); the model looks its rows up once per forward (``lookup``) and every layer
reuses them (``apply``), so no layer does position work of its own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from kvyard.kernels import cpu_ops
from kvyard.kernels import use_cpu_kernel, use_triton


@dataclass(frozen=True)
class RopeConfig:
    head_dim: int                 # rotated size (the whole head: partial rotary is not supported)
    max_position: int             # cache rows; positions must stay below this
    theta: float = 10000.0
    rope_type: str = "default"
    scaling: dict = field(default_factory=dict)   # the type's extra keys (factor, ...)

    def __post_init__(self):
        if self.rope_type not in _INV_FREQ:
            raise ValueError(f"rope_type {self.rope_type!r} is not supported; "
                             f"supported: {', '.join(sorted(_INV_FREQ))}")
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"head_dim must be a positive even number, got {self.head_dim}")
        if self.max_position <= 0:
            raise ValueError(f"max_position must be positive, got {self.max_position}")


def rope_config_from_hf(hf_config: Any, head_dim: int, layer_type: str | None = None) -> RopeConfig:
    """Reads ``rope_parameters`` (transformers >= 5) or ``rope_theta``/``rope_scaling`` (older).
    Per-layer-type parameters ({"sliding_attention": {...}, "full_attention": {...}}) need the
    ``layer_type`` whose settings to read."""
    params = getattr(hf_config, "rope_parameters", None)
    if not params:
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    if params and all(isinstance(v, dict) for v in params.values()):
        if layer_type not in params:
            raise ValueError(f"rope_parameters: per-layer-type rope settings ({', '.join(params)}) "
                             f"need a layer type this model knows, got {layer_type!r}")
        params = params[layer_type]
    params = dict(params)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    theta = float(params.pop("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
    if float(params.pop("partial_rotary_factor", 1.0) or 1.0) != 1.0:
        raise ValueError("rope_parameters.partial_rotary_factor != 1 is not supported")
    max_position = int(getattr(hf_config, "max_position_embeddings", 2048))
    if rope_type == "longrope":
        params.setdefault("original_max_position_embeddings",
                          getattr(hf_config, "original_max_position_embeddings", None) or max_position)
        params.setdefault("max_position_embeddings", max_position)
    if rope_type in ("linear", "yarn") and params.get("factor"):
        # the cache must reach the extended context even when the config states the original one
        original = int(params.get("original_max_position_embeddings") or max_position)
        max_position = max(max_position, int(original * float(params["factor"])))
    return RopeConfig(head_dim=head_dim, max_position=max_position, theta=theta,
                      rope_type=rope_type, scaling=params)


# -- inverse frequencies per rope_type: (config) -> (inv_freq [head_dim / 2] float32, cos/sin scale)

def _default_inv_freq(cfg: RopeConfig) -> torch.Tensor:
    exponents = torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim
    return 1.0 / (cfg.theta ** exponents)


def _required(cfg: RopeConfig, key: str) -> float:
    if cfg.scaling.get(key) is None:
        raise ValueError(f"rope_parameters.{key} is required for rope_type {cfg.rope_type!r}")
    return float(cfg.scaling[key])


def _default(cfg: RopeConfig) -> tuple[torch.Tensor, float]:
    return _default_inv_freq(cfg), 1.0


def _linear(cfg: RopeConfig) -> tuple[torch.Tensor, float]:
    # positions are divided by the factor, which is the same as dividing the frequencies
    return _default_inv_freq(cfg) / _required(cfg, "factor"), 1.0


def _llama3(cfg: RopeConfig) -> tuple[torch.Tensor, float]:
    # Long wavelengths (> original context / low_freq_factor) are slowed by `factor`, short ones
    # (< original context / high_freq_factor) are kept, and the band between is interpolated.
    factor = _required(cfg, "factor")
    low, high = _required(cfg, "low_freq_factor"), _required(cfg, "high_freq_factor")
    original = _required(cfg, "original_max_position_embeddings")
    inv_freq = _default_inv_freq(cfg)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(in_band, blended, scaled), 1.0


def _yarn(cfg: RopeConfig) -> tuple[torch.Tensor, float]:
    s = cfg.scaling
    original = _required(cfg, "original_max_position_embeddings")
    factor = float(s["factor"]) if s.get("factor") else cfg.max_position / original
    dim, base = cfg.head_dim, cfg.theta

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attention_factor = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)

    def dim_of(rotations: float) -> float:  # the frequency index that turns `rotations` times
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(s.get("beta_fast") or 32), dim_of(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolated = _default_inv_freq(cfg)
    interpolated = extrapolated / factor
    keep = 1 - ramp   # 1: high frequency, kept as is; 0: low frequency, interpolated
    return interpolated * (1 - keep) + extrapolated * keep, float(attention_factor)


def _longrope(cfg: RopeConfig) -> tuple[torch.Tensor, float]:
    """[max_position, head_dim / 2] per-position frequencies: short factors below the original
    context, long ones from it on (see the module docstring); the cos/sin scale as HF's."""
    s = cfg.scaling
    original = int(_required(cfg, "original_max_position_embeddings"))
    factor = s.get("factor") or float(s.get("max_position_embeddings", cfg.max_position)) / original
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    half = cfg.head_dim // 2
    factors = []
    for key in ("short_factor", "long_factor"):
        values = s.get(key)
        if values is None or len(values) != half:
            raise ValueError(f"rope_parameters.{key} must list head_dim / 2 = {half} factors")
        factors.append(torch.tensor(values, dtype=torch.float32))
    wavelength = cfg.theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim)
    short, long = (1.0 / (f * wavelength) for f in factors)   # HF's order of operations
    positions = torch.arange(cfg.max_position)[:, None]
    return torch.where(positions < original, short[None, :], long[None, :]), float(attention_factor)


_INV_FREQ: dict[str, Callable[[RopeConfig], tuple[torch.Tensor, float]]] = {
    "default": _default, "linear": _linear, "llama3": _llama3, "yarn": _yarn, "longrope": _longrope,
    "dynamic": _default,   # see the module docstring: identical below max_position_embeddings
}


class RotaryEmbedding(nn.Module):
    """Holds cos_sin_cache [max_position, head_dim] = [cos(p * f) | sin(p * f)] (already scaled)."""

    def __init__(self, cfg: RopeConfig, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        super().__init__()
        self.cfg = cfg
        inv_freq, scale = _INV_FREQ[cfg.rope_type](cfg)
        # inv_freq is [head_dim / 2], or [max_position, head_dim / 2] when it varies by position
        angles = torch.arange(cfg.max_position, dtype=torch.int64).float()[:, None] * inv_freq
        cache = torch.cat([angles.cos() * scale, angles.sin() * scale], dim=-1)
        self.register_buffer("cos_sin_cache", cache.to(dtype=dtype, device=device), persistent=False)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> (cos, sin), each [T, 1, head_dim] (halves duplicated), broadcast over heads."""
        cos, sin = self.cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
        return torch.cat([cos, cos], dim=-1).unsqueeze(1), torch.cat([sin, sin], dim=-1).unsqueeze(1)

    @staticmethod
    def apply(x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [T, heads, head_dim] -> x * cos + rotate_half(x) * sin (a new tensor, same shape).

        Rotate q and k in one call by viewing the [q | k] columns of a fused qkv output as
        [T, Hq + Hkv, D]: one set of kernels for both.
        """
        cos, sin = cos_sin
        if use_triton("rotary", x):
            from kvyard.kernels.triton_ops.rotary import apply_rotary
            return apply_rotary(x, cos, sin)
        if use_cpu_kernel("rotary", x):
            return cpu_ops.apply_rotary(x, cos, sin)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return torch.addcmul(x * cos, rotated, sin)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.apply(x, self.lookup(positions))

    def extra_repr(self) -> str:
        return f"type={self.cfg.rope_type}, head_dim={self.cfg.head_dim}, max_position={self.cfg.max_position}"
