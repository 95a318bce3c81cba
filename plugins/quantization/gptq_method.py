"""gptq: 4-bit GPTQ checkpoints -> the canonical int4 layout (kvyard.layers.quant_math).

Checkpoint tensors per projection (N out, K in, G groups):
  qweight [K/8, N] int32   8 consecutive inputs per int32, nibble i = input 8r + i (canonical)
  qzeros  [G, N/8] int32   zero points packed along N, nibble i = column 8c + i; the classic
                           format ("checkpoint_format": "gptq", AutoGPTQ) stores zero - 1 (so a
                           symmetric checkpoint stores 7), "gptq_v2" stores the zero itself
  scales  [G, N]           float16
  g_idx   [K] int32        group of each input; with desc_act (act-order) a permutation of
                           k // group_size; absent: k // group_size
group_size -1 means one group over all of K. W[n, k] = (q[k, n] - zero[g_idx[k], n]) * scale[g_idx[k], n].
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from kvyard.layers import quant_math as qm
from kvyard.layers.quantized_linear import Int4LinearMethod, Int4Shard, OnlineInt4LinearMethod
from kvyard.quantization import NEVER_ONLINE, LinearMethod, QuantizationMethod, skipped

ONLINE_GROUP = 128


class GPTQLinearMethod(Int4LinearMethod):
    checkpoint_names = ("qweight", "qzeros", "scales")
    optional_checkpoint_names = ("g_idx",)

    def __init__(self, dtype, device, group_size: int, v1_zeros: bool):
        super().__init__(dtype, device, group_size)
        self.v1_zeros = v1_zeros

    def finalize(self, layer, parts) -> None:
        if self.group_size == -1:   # one group spanning K, known once the layer exists
            self.group_size = layer.in_features
        super().finalize(layer, parts)

    def to_canonical(self, layer, shard: int, rows: int, parts: dict[str, torch.Tensor]) -> Int4Shard:
        k = layer.in_features
        groups = -(-k // self.group_size)
        self.check_shape(layer, shard, "qweight", parts["qweight"], (k // 8, rows))
        self.check_shape(layer, shard, "qzeros", parts["qzeros"], (groups, rows // 8))
        self.check_shape(layer, shard, "scales", parts["scales"], (groups, rows))
        zeros = qm.unpack_int4_cols(parts["qzeros"].to(torch.int32))
        if self.v1_zeros:
            zeros = (zeros + 1) & 0xF
        g_idx = parts.get("g_idx")
        if g_idx is None:
            g_idx = torch.arange(k, dtype=torch.int32) // self.group_size
        self.check_shape(layer, shard, "g_idx", g_idx, (k,))
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
            raise ValueError(f"{layer.prefix}: g_idx values outside 0..{groups - 1}")
        return Int4Shard(parts["qweight"].to(torch.int32), parts["scales"], zeros, g_idx.to(torch.int32))


class GPTQQuantization(QuantizationMethod):
    """Checkpoints declaring quant_method "gptq"; on a float checkpoint ``--quantization gptq``
    quantizes online by round-to-nearest (int4, group 128, symmetric; no calibration)."""
    name = "gptq"
    online = True

    @classmethod
    def check_checkpoint(cls, qc: Mapping[str, Any]) -> None:
        if qc.get("bits", 4) != 4:
            raise ValueError(f"quantization_config.bits: gptq supports 4, got {qc.get('bits')}")
        group = qc.get("group_size", 128)
        if group not in (-1, 32, 64, 128):
            raise ValueError(f"quantization_config.group_size: expected -1, 32, 64 or 128, got {group}")
        fmt = qc.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"quantization_config.checkpoint_format: {fmt!r} is not supported (gptq, gptq_v2)")

    def __init__(self, config):
        super().__init__(config)
        qc = config.checkpoint or {}
        self.group_size = qc.get("group_size", 128)
        self.v1_zeros = qc.get("checkpoint_format", "gptq") == "gptq"
        self.ignore = qc.get("modules_to_not_convert") or ()

    def linear_method(self, prefix: str) -> LinearMethod:
        if prefix in NEVER_ONLINE or skipped(prefix, self.ignore):
            return self.unquantized()
        if self.config.checkpoint is None:
            return OnlineInt4LinearMethod(self.config.dtype, self.config.device, ONLINE_GROUP)
        return GPTQLinearMethod(self.config.dtype, self.config.device, self.group_size, self.v1_zeros)

