"""The model-architecture plugin kind.

A model class is registered by HF architecture name and built as ``cls(hf_config, ctx)``.
It must provide:
  forward(input_ids [T], positions [T], fb: ForwardBatch) -> hidden states [T, hidden]
  compute_logits(hidden [N, hidden]) -> logits [N, vocab] in float32
  load_weights(weights: Iterable[(hf_name, tensor)]) -> None
and may set ``is_generation = False`` (embedding models) and provide ``pool(hidden, fb)``.
A model whose KV cache is not K and V per KV head of its config's sizes provides
  kv_layout() -> kvyard.kv_layout.KVLayout
(e.g. DeepSeek's multi-head latent attention); the pool is allocated from it and attention
backends that do not serve it refuse to start.
A model whose decode step is the plain pre-norm graph of kvyard.layers.lowering may provide
  lowered_decoder() -> kvyard.layers.lowering.LoweredDecoder | None
and small CPU decode batches then run through the C++ decode loop (kvyard.executor.lowered_decode).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from kvyard.quantization import LinearMethod, QuantizationMethod, UnquantizedLinearMethod


@dataclass(frozen=True)
class ModelBuildContext:
    dtype: torch.dtype
    device: str
    quantization: Optional[QuantizationMethod] = None

    def linear_method(self, prefix: str) -> LinearMethod:
        if self.quantization is None:
            return UnquantizedLinearMethod(self.dtype, self.device)
        return self.quantization.linear_method(prefix)
