"""compressed-tensors checkpoints on kvyard.layers.quantized_linear (no runtime dependency on the
compressed-tensors library: the formats are read here).

quantization_config: ``config_groups`` (each: ``targets``, ``weights``, ``input_activations``,
``format``), ``ignore`` (names or ``re:`` patterns), top-level ``format``. A linear layer takes the
first group whose targets name "Linear", its own name or a matching ``re:`` pattern. Schemes:

  weights float 8 (channel | tensor | block) + activations float 8 dynamic per token / group,
  static per tensor, or none (weight-only)       -> Fp8LinearMethod; tensors weight (fp8),
                                                    weight_scale ([N, 1], [1] or [N/bn, K/bk]),
                                                    input_scale when static
  weights int 8 channel + activations int 8       -> Int8LinearMethod; weight (int8), weight_scale
  weights int 4 group/channel, no activations,   -> canonical int4; tensors weight_packed [N, K/8]
  format pack-quantized                            int32 (8 consecutive inputs per int32, stored
                                                    value = q + 8), weight_scale [N, G],
                                                    weight_shape [2], weight_zero_point [N/8, G]
                                                    (packed along N, + 8) when asymmetric,
                                                    weight_g_idx [K] with group act-order
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import torch

from kvyard.layers import quant_math as qm
from kvyard.layers.quantized_linear import (Fp8LinearMethod, Fp8Scheme, Int4LinearMethod, Int4Shard,
                                            Int8LinearMethod)
from kvyard.quantization import NEVER_ONLINE, LinearMethod, QuantizationMethod, skipped


class PackedInt4LinearMethod(Int4LinearMethod):
    checkpoint_names = ("weight_packed", "weight_scale", "weight_shape")

    def __init__(self, dtype, device, group_size: Optional[int], symmetric: bool, act_order: bool):
        super().__init__(dtype, device, group_size or 0)
        self.symmetric = symmetric
        self.checkpoint_names = PackedInt4LinearMethod.checkpoint_names + (() if symmetric else ("weight_zero_point",))
        self.optional_checkpoint_names = ("weight_g_idx",) if act_order else ()

    def finalize(self, layer, parts) -> None:
        if not self.group_size:   # strategy "channel": one group over K
            self.group_size = layer.in_features
        super().finalize(layer, parts)

    def to_canonical(self, layer, shard: int, rows: int, parts: dict[str, torch.Tensor]) -> Int4Shard:
        k, groups = layer.in_features, layer.in_features // self.group_size
        shape = [int(v) for v in parts["weight_shape"].reshape(-1)]
        if shape != [rows, k]:
            raise ValueError(f"{layer.prefix}: shard {shard} weight_shape {shape} does not match {[rows, k]}")
        self.check_shape(layer, shard, "weight_packed", parts["weight_packed"], (rows, k // 8))
        self.check_shape(layer, shard, "weight_scale", parts["weight_scale"], (rows, groups))
        q = qm.unpack_int4_cols(parts["weight_packed"].to(torch.int32))            # [rows, K], +8 stored
        if self.symmetric:
            zeros = torch.full((groups, rows), 8, dtype=torch.int32)
        else:
            zp = parts["weight_zero_point"].to(torch.int32)
            self.check_shape(layer, shard, "weight_zero_point", zp, (-(-rows // 8), groups))
            zeros = qm.unpack_int4_rows(zp)[:rows].t()                             # [G, rows], +8 stored
        g_idx = parts.get("weight_g_idx")
        g_idx = torch.arange(k, dtype=torch.int32) // self.group_size if g_idx is None else g_idx.to(torch.int32)
        return Int4Shard(qm.pack_int4_rows(q.t().contiguous()), parts["weight_scale"].t(), zeros, g_idx)


def _scheme_method(scheme: Mapping[str, Any], fmt: str, dtype, device) -> LinearMethod:
    w = scheme.get("weights") or {}
    a = scheme.get("input_activations")
    bits, kind, strategy = w.get("num_bits"), w.get("type", "int"), w.get("strategy")
    if kind == "float" and bits == 8:
        if a is None:
            activation = "none"
        elif a.get("dynamic"):
            activation = "dynamic"
        else:
            activation = "static"
        if strategy == "block":
            block = tuple(w.get("block_structure") or (128, 128))
            if activation == "static":
                raise ValueError("quantization_config: block-scaled fp8 with static activations is not supported")
            return Fp8LinearMethod(dtype, device, Fp8Scheme("block", "dynamic" if a else "none", block))
        if strategy not in ("channel", "tensor"):
            raise ValueError(f"quantization_config.weights.strategy: fp8 {strategy!r} is not supported")
        return Fp8LinearMethod(dtype, device, Fp8Scheme(strategy, activation))
    if kind == "int" and bits == 8 and a is not None and a.get("num_bits") == 8 and a.get("type", "int") == "int":
        if not w.get("symmetric", True):
            raise ValueError("quantization_config.weights.symmetric: asymmetric int8 weights are not supported")
        return Int8LinearMethod(dtype, device, checkpoint=True, static=not a.get("dynamic"), act_qmax=127.5)
    if kind == "int" and bits == 4 and a is None:
        if fmt != "pack-quantized":
            raise ValueError(f"quantization_config.format: int4 weights need pack-quantized, got {fmt!r}")
        if strategy not in ("group", "channel"):
            raise ValueError(f"quantization_config.weights.strategy: int4 {strategy!r} is not supported")
        group = w.get("group_size") if strategy == "group" else None
        return PackedInt4LinearMethod(dtype, device, group, bool(w.get("symmetric", True)),
                                      act_order=w.get("actorder") is not None)
    raise ValueError(f"quantization_config.config_groups: weights {kind}{bits} with activations "
                     f"{None if a is None else str(a.get('type')) + str(a.get('num_bits'))} is not supported yet")


class CompressedTensorsQuantization(QuantizationMethod):
    name = "compressed-tensors"

    @classmethod
    def check_checkpoint(cls, qc: Mapping[str, Any]) -> None:
        status = qc.get("quantization_status", "compressed")
        if status != "compressed":
            raise ValueError(f"quantization_config.quantization_status: {status!r} checkpoints are not "
                             "supported (compressed only)")
        if not qc.get("config_groups"):
            raise ValueError("quantization_config.config_groups: missing")
        for name, group in qc["config_groups"].items():
            _scheme_method(group, group.get("format") or qc.get("format", ""), torch.float32, "cpu")

    def __init__(self, config):
        super().__init__(config)
        if config.checkpoint is None:
            raise ValueError("quantization: compressed-tensors serves checkpoints that declare it")
        self.qc = config.checkpoint
        self.ignore = self.qc.get("ignore") or ()

    def _group(self, prefix: str) -> Optional[Mapping[str, Any]]:
        names = [prefix] + [prefix.replace(f, p) for f, ps in (("qkv_proj", ("q_proj", "k_proj", "v_proj")),
                                                               ("gate_up_proj", ("gate_proj", "up_proj")))
                            if f in prefix for p in ps]
        for group in self.qc["config_groups"].values():
            for target in group.get("targets", ()):
                if target == "Linear" or target in names or (
                        target.startswith("re:") and any(re.match(target[3:], n) for n in names)):
                    return group
        return None

    def linear_method(self, prefix: str) -> LinearMethod:
        group = None if prefix in NEVER_ONLINE or skipped(prefix, self.ignore) else self._group(prefix)
        if group is None:
            return self.unquantized()
        fmt = group.get("format") or self.qc.get("format", "")
        return _scheme_method(group, fmt, self.config.dtype, self.config.device)
