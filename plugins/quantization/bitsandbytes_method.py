"""bitsandbytes: weights quantized by the bitsandbytes library, multiplied by its kernels.

Online (``--quantization bitsandbytes`` on a float checkpoint): nf4, block size 64 (the library's
default, what transformers' ``load_in_4bit`` does). Checkpoints declaring ``quant_method
"bitsandbytes"``: 4-bit (``load_in_4bit``) ones store per projection ``weight`` (packed uint8)
and its quant state (``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``,
``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4|fp4``), which
bitsandbytes.functional.QuantState.from_dict reads; 8-bit (``load_in_8bit``) ones store ``weight``
int8 [N, K] and ``SCB`` [N] (row absmax: W = weight * SCB / 127). Fused layers keep one quant
state per shard and concatenate the shards' outputs.

bitsandbytes is optional (pip install bitsandbytes); it runs on the CPU here.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from kvyard.layers.quantized_linear import ShardedLinearMethod, _flat, _unflat
from kvyard.quantization import NEVER_ONLINE, LinearMethod, QuantizationMethod, skipped

INSTALL = "bitsandbytes is not installed: pip install bitsandbytes"
STATE_4BIT = ("weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
              "weight.quant_state.bitsandbytes__nf4", "weight.quant_state.bitsandbytes__fp4")


def _bnb():
    try:
        import bitsandbytes
        import bitsandbytes.functional
    except ImportError:
        raise ValueError(f"quantization: {INSTALL}") from None
    return bitsandbytes


class BnB4bitLinearMethod(ShardedLinearMethod):
    def __init__(self, dtype, device, checkpoint: bool):
        self.dtype, self.device, self.checkpoint = dtype, torch.device(device), checkpoint
        self.optional_checkpoint_names = STATE_4BIT if checkpoint else ()

    def finalize(self, layer, parts) -> None:
        bnb = _bnb()
        layer.bnb_shards = []
        for shard, (rows, p) in enumerate(zip(layer.output_sizes, parts)):
            if self.checkpoint:
                state = {name[len("weight."):]: t for name, t in p.items() if name != "weight"}
                qs = bnb.functional.QuantState.from_dict(state, device=self.device)
                q = p["weight"].to(self.device)
            else:
                w = p["weight"]
                self.check_shape(layer, shard, "weight", w, (rows, layer.in_features))
                q, qs = bnb.functional.quantize_4bit(w.to(self.device, self.dtype), blocksize=64, quant_type="nf4")
            if tuple(qs.shape) != (rows, layer.in_features):
                raise ValueError(f"{layer.prefix}: shard {shard} quant state shape {tuple(qs.shape)} "
                                 f"does not match {(rows, layer.in_features)}")
            layer.bnb_shards.append((q, qs))

    def dequantize(self, layer) -> torch.Tensor:
        bnb = _bnb()
        return torch.cat([bnb.functional.dequantize_4bit(q, qs).to(self.dtype) for q, qs in layer.bnb_shards])

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        bnb = _bnb()
        x2 = _flat(layer, x).to(self.dtype)
        ys = [bnb.matmul_4bit(x2, q.t(), quant_state=qs) for q, qs in layer.bnb_shards]
        return _unflat(layer, x, ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1))


class BnB8bitLinearMethod(ShardedLinearMethod):
    """LLM.int8 checkpoints, multiplied as dequantized weights (no outlier decomposition:
    llm_int8_threshold is ignored, which is exact for the stored weights)."""
    checkpoint_names = ("weight", "SCB")

    def __init__(self, dtype, device):
        self.dtype, self.device = dtype, torch.device(device)

    def finalize(self, layer, parts) -> None:
        ws, scb = [], []
        for shard, (rows, p) in enumerate(zip(layer.output_sizes, parts)):
            self.check_shape(layer, shard, "weight", p["weight"], (rows, layer.in_features))
            ws.append(p["weight"].to(torch.int8))
            scb.append(p["SCB"].float().reshape(rows))
        self.set_buffer(layer, "weight", torch.cat(ws), self.device)
        self.set_buffer(layer, "weight_scale", torch.cat(scb) / 127.0, self.device)

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        w = (layer.weight.float() * layer.weight_scale.view(-1, 1)).to(self.dtype)
        return _unflat(layer, x, F.linear(_flat(layer, x).to(self.dtype), w))


class BitsAndBytesQuantization(QuantizationMethod):
    name = "bitsandbytes"
    online = True

    @classmethod
    def check_checkpoint(cls, qc: Mapping[str, Any]) -> None:
        _bnb()
        if not (qc.get("load_in_4bit") or qc.get("load_in_8bit")):
            raise ValueError("quantization_config: bitsandbytes checkpoints need load_in_4bit or load_in_8bit")

    def __init__(self, config):
        super().__init__(config)
        _bnb()
        qc = config.checkpoint
        self.eight_bit = bool(qc and qc.get("load_in_8bit"))
        self.ignore = () if qc is None else (qc.get("llm_int8_skip_modules") or ())

    def linear_method(self, prefix: str) -> LinearMethod:
        if prefix in NEVER_ONLINE or skipped(prefix, self.ignore):
            return self.unquantized()
        if self.eight_bit:
            return BnB8bitLinearMethod(self.config.dtype, self.config.device)
        return BnB4bitLinearMethod(self.config.dtype, self.config.device, self.config.checkpoint is not None)
