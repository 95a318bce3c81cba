"""The KV-cache storage dtype (--kv-cache-dtype) and its per-layer scales.

auto stores k/v in the model dtype. fp8_e4m3 / fp8_e5m2 store k / k_scale and v / v_scale per
layer (kv_pool.py); the scales come, in this order, from --quantization-param-path, from the
checkpoint (``model.layers.<i>.self_attn.k_scale`` / ``v_scale``, read by the model into its
Attention layers), else 1.0 (right for activations of magnitude up to the fp8 range:
448 for e4m3, 57344 for e5m2). Only attention backends with ``supports_fp8_kv`` read an fp8 pool.
"""
from __future__ import annotations

import json
import logging
from typing import Optional

import torch

logger = logging.getLogger(__name__)

KV_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2,
             "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_kv_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    if name == "auto":
        return model_dtype
    if name not in KV_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of auto, {', '.join(KV_DTYPES)}, got {name!r}")
    return KV_DTYPES[name]


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def read_scales_file(path: str, num_layers: int) -> tuple[list[float], list[float]]:
    """--quantization-param-path: ``{"kv_cache": {"scaling_factor": {"0": {"<layer>": s}}}}``
    (one scale for k and v per layer, tensor-parallel rank "0") or ``{"k_scale": {"<layer>": s},
    "v_scale": {...}}``. Layers not listed keep 1.0."""
    try:
        data = json.loads(open(path).read())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"quantization_param_path: cannot read {path}: {exc}") from None
    k, v = [1.0] * num_layers, [1.0] * num_layers
    if "kv_cache" in data:
        table = data["kv_cache"].get("scaling_factor", {}).get("0", {})
        pairs = [(table, k), (table, v)]
    elif "k_scale" in data or "v_scale" in data:
        pairs = [(data.get("k_scale", {}), k), (data.get("v_scale", {}), v)]
    else:
        raise ValueError("quantization_param_path: expected kv_cache.scaling_factor or k_scale / v_scale")
    for table, out in pairs:
        for layer, scale in table.items():
            i = int(layer)
            if not 0 <= i < num_layers or not float(scale) > 0:
                raise ValueError(f"quantization_param_path: bad entry layer {layer!r} scale {scale!r}")
            out[i] = float(scale)
    return k, v


def kv_scales(kv_dtype: torch.dtype, model: torch.nn.Module, num_layers: int,
              param_path: Optional[str]) -> Optional[tuple[list[float], list[float]]]:
    """Per-layer (k, v) scales for an fp8 pool; None for other dtypes."""
    if not is_fp8(kv_dtype):
        return None
    if param_path:
        logger.info("fp8 KV cache: scales from %s", param_path)
        return read_scales_file(param_path, num_layers)
    from kvyard.layers.attention import Attention

    k, v = [1.0] * num_layers, [1.0] * num_layers
    found = False
    for module in model.modules():
        if isinstance(module, Attention) and module.layer_id < num_layers:
            for which, out in (("k", k), ("v", v)):
                scale = getattr(module, f"{which}_scale", None)
                if scale is not None:
                    out[module.layer_id], found = scale, True
    logger.info("fp8 KV cache: scales %s", "from the checkpoint" if found else "1.0 (none given)")
    return k, v


def check_backends(kv_dtype: torch.dtype, backends: dict[str, type]) -> None:
    """An fp8 pool needs attention backends that read it; others are refused by name."""
    if not is_fp8(kv_dtype):
        return
    for name, cls in backends.items():
        if not getattr(cls, "supports_fp8_kv", False):
            raise ValueError(f"kv_cache_dtype: attention backend {name} does not read an fp8 KV cache "
                             "(torch_native and triton do)")
