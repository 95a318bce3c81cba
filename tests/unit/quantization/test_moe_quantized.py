"""Quantized experts through the quantization methods' interface: with a QuantizationMethod in
the build context, FusedMoE builds each expert's gate_up / down as Linear layers whose
LinearMethod the method picks. With the GGUF method the experts keep their Q8_0 / Q4_0 blocks
and match the dense layer holding the dequantized weights, within the GGUF kernels' tolerance
(test_gguf_quant.py: activations are quantized per 32-value block)."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from kvyard.layers.linear import Linear
from kvyard.layers.moe import FusedMoE, RoutingConfig, select_experts
from kvyard.loader import QuantizedTensor
from kvyard.model_base import ModelBuildContext
from kvyard.quantization import QuantizationConfig
from kvyard_plugins.quantization import gguf_kernels
from kvyard_plugins.quantization.gguf_method import GGUFQuantization

Q = gguf.GGMLQuantizationType
E, H, INTER, TOP_K, T = 4, 64, 96, 2, 9


def quantized(qtype: Q, rows: int, cols: int, rng) -> QuantizedTensor:
    data = gguf.quants.quantize(rng.standard_normal((rows, cols), dtype=np.float32), qtype)
    return QuantizedTensor(torch.from_numpy(data), (rows, cols), int(qtype))


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0])
def test_gguf_experts_keep_their_blocks_and_match_dense(qtype):
    if not gguf_kernels.available():
        pytest.skip("the GGUF CPU kernels do not build here")
    rng = np.random.default_rng(0)
    quant = GGUFQuantization(QuantizationConfig("gguf", torch.float32, "cpu"))
    packed = FusedMoE(E, H, INTER, ModelBuildContext(torch.float32, "cpu", quant), "model.layers.0.mlp.experts")
    dense = FusedMoE(E, H, INTER, ModelBuildContext(torch.float32, "cpu"), "model.layers.0.mlp.experts")
    for e in range(E):
        for part, shape in (("gate", (INTER, H)), ("up", (INTER, H)), ("down", (H, INTER))):
            w = quantized(qtype, *shape, rng)
            packed.load_expert(e, part, w)
            dense.load_expert(e, part, w.dequantize())
    for module in packed.modules():
        if isinstance(module, Linear):
            module.process_after_loading()
    assert packed.experts[0].gate_up_proj.gguf_segments[0].file_qtype == qtype.name   # kept packed
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(1))
    weights, ids = select_experts(torch.randn(T, E, generator=torch.Generator().manual_seed(2)),
                                  RoutingConfig(E, TOP_K, renormalize=True))
    got, want = packed(x, weights, ids), dense(x, weights, ids)
    assert ((got - want).abs().max() / want.abs().max()).item() < 5e-4   # measured ~3e-5 / 7e-5
