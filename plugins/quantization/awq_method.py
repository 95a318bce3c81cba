"""awq: 4-bit AutoAWQ "gemm" checkpoints -> the canonical int4 layout (kvyard.layers.quant_math).

Checkpoint tensors per projection (N out, K in, G = K / group_size):
  qweight [K, N/8] int32   8 output columns per int32, nibble i holding column ORDER[i] of its
                           group of 8 (AutoAWQ's interleave [0, 2, 4, 6, 1, 3, 5, 7])
  qzeros  [G, N/8] int32   the zero points, packed the same way (zero_point false: none stored
                           meaningfully; the zero is 8)
  scales  [G, N]           float16
W[n, k] = (q[k, n] - zero[k // group_size, n]) * scale[k // group_size, n].
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from kvyard.layers import quant_math as qm
from kvyard.layers.quantized_linear import Int4LinearMethod, Int4Shard
from kvyard.quantization import NEVER_ONLINE, LinearMethod, QuantizationMethod, skipped

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


class AWQLinearMethod(Int4LinearMethod):
    checkpoint_names = ("qweight", "qzeros", "scales")

    def __init__(self, dtype, device, group_size: int, zero_point: bool):
        super().__init__(dtype, device, group_size)
        self.zero_point = zero_point

    def to_canonical(self, layer, shard: int, rows: int, parts: dict[str, torch.Tensor]) -> Int4Shard:
        k, g = layer.in_features, self.group_size
        self.check_shape(layer, shard, "qweight", parts["qweight"], (k, rows // 8))
        self.check_shape(layer, shard, "qzeros", parts["qzeros"], (k // g, rows // 8))
        self.check_shape(layer, shard, "scales", parts["scales"], (k // g, rows))
        q = qm.unpack_int4_cols(parts["qweight"].to(torch.int32), ORDER)              # [K, rows]
        zeros = qm.unpack_int4_cols(parts["qzeros"].to(torch.int32), ORDER) if self.zero_point \
            else torch.full((k // g, rows), 8, dtype=torch.int32)
        g_idx = torch.arange(k, dtype=torch.int32) // g
        return Int4Shard(qm.pack_int4_rows(q), parts["scales"], zeros, g_idx)


class AWQQuantization(QuantizationMethod):
    name = "awq"

    @classmethod
    def check_checkpoint(cls, qc: Mapping[str, Any]) -> None:
        bits = qc.get("bits", qc.get("w_bit", 4))
        if bits != 4:
            raise ValueError(f"quantization_config.bits: awq supports 4, got {bits}")
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"quantization_config.version: awq {version!r} is not supported yet (gemm only)")
        group = qc.get("group_size", qc.get("q_group_size", 128))
        if group not in (32, 64, 128):
            raise ValueError(f"quantization_config.group_size: expected 32, 64 or 128, got {group}")

    def __init__(self, config):
        super().__init__(config)
        qc = config.checkpoint or {}
        self.group_size = qc.get("group_size", qc.get("q_group_size", 128))
        self.zero_point = bool(qc.get("zero_point", True))
        self.ignore = qc.get("modules_to_not_convert") or ()

    def linear_method(self, prefix: str) -> LinearMethod:
        if prefix in NEVER_ONLINE or skipped(prefix, self.ignore):
            return self.unquantized()
        return AWQLinearMethod(self.config.dtype, self.config.device, self.group_size, self.zero_point)
