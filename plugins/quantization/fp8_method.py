"""fp8 weights (float8_e4m3fn) with fp8 activations, on kvyard.layers.quantized_linear.

fp8 claims:
  - online (``--quantization fp8`` on a bf16/fp16/fp32 checkpoint): per-channel weight scales
    (each output row's amax -> 448), dynamic per-token activation scales;
  - checkpoints with ``quantization_config = {"quant_method": "fp8", "activation_scheme":
    "static" | "dynamic", ...}``: per-tensor ``weight_scale`` (+ ``input_scale`` when static),
    or with ``"weight_block_size": [128, 128]`` (DeepSeek-V3, Qwen3-FP8) one ``weight_scale_inv``
    per 128x128 block (a multiplier, despite the name) and per-token-group activations.
w8a8_fp8 claims ``quant_method "w8a8_fp8"`` checkpoints (weight + per-channel ``weight_scale``,
dynamic per-token activations) and quantizes online exactly like fp8.

Layers named in the checkpoint's ``ignored_layers`` / ``modules_to_not_convert`` and the output
head stay in the model dtype.
"""
from __future__ import annotations

from typing import Any, Mapping

from kvyard.layers.quantized_linear import Fp8LinearMethod, Fp8Scheme
from kvyard.quantization import NEVER_ONLINE, LinearMethod, QuantizationMethod, skipped

ONLINE = Fp8Scheme(weight="channel", activation="dynamic", checkpoint=False)


def scheme_from_checkpoint(qc: Mapping[str, Any]) -> Fp8Scheme:
    activation = qc.get("activation_scheme", "dynamic")
    if activation not in ("static", "dynamic"):
        raise ValueError(f"quantization_config.activation_scheme: {activation!r} is not static or dynamic")
    block = qc.get("weight_block_size")
    if block is not None:
        if len(block) != 2 or min(block) < 1:
            raise ValueError(f"quantization_config.weight_block_size: expected [rows, cols], got {block}")
        if activation != "dynamic":
            raise ValueError("quantization_config.activation_scheme: block-scaled fp8 needs dynamic activations")
        return Fp8Scheme(weight="block", activation="dynamic", block=tuple(block), scale_name="weight_scale_inv")
    return Fp8Scheme(weight="tensor", activation=activation)


class Fp8Quantization(QuantizationMethod):
    name = "fp8"
    online = True

    @classmethod
    def check_checkpoint(cls, quant_config: Mapping[str, Any]) -> None:
        scheme_from_checkpoint(quant_config)
        fmt = quant_config.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise ValueError(f"quantization_config.fmt: {fmt!r} is not supported (e4m3 only)")

    def __init__(self, config):
        super().__init__(config)
        qc = config.checkpoint
        self.scheme = ONLINE if qc is None else scheme_from_checkpoint(qc)
        self.ignore = () if qc is None else (qc.get("ignored_layers") or qc.get("modules_to_not_convert") or ())

    def linear_method(self, prefix: str) -> LinearMethod:
        if prefix in NEVER_ONLINE or skipped(prefix, self.ignore):
            return self.unquantized()
        return Fp8LinearMethod(self.config.dtype, self.config.device, self.scheme)


class W8A8Fp8Quantization(Fp8Quantization):
    name = "w8a8_fp8"

    @classmethod
    def check_checkpoint(cls, quant_config: Mapping[str, Any]) -> None:
        pass

    def __init__(self, config):
        QuantizationMethod.__init__(self, config)
        qc = config.checkpoint
        self.scheme = ONLINE if qc is None else Fp8Scheme(weight="channel", activation="dynamic")
        self.ignore = () if qc is None else (qc.get("ignored_layers") or qc.get("modules_to_not_convert") or ())
