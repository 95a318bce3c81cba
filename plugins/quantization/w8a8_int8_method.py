"""w8a8_int8: symmetric int8 weights with per-channel scales, dynamic per-token int8
activations, int32 accumulation (torch._int_mm on the CPU and CUDA).

Claims online ``--quantization w8a8_int8`` on float checkpoints and checkpoints declaring
``quant_method "w8a8_int8"`` (SGLang's format: ``weight`` int8 [N, K], ``weight_scale`` [N, 1]).
The output head stays in the model dtype.
"""
from __future__ import annotations

from kvyard.layers.quantized_linear import Int8LinearMethod
from kvyard.quantization import NEVER_ONLINE, LinearMethod, QuantizationMethod, skipped


class W8A8Int8Quantization(QuantizationMethod):
    name = "w8a8_int8"
    online = True

    def __init__(self, config):
        super().__init__(config)
        qc = config.checkpoint
        self.ignore = () if qc is None else (qc.get("ignore") or qc.get("modules_to_not_convert") or ())

    def linear_method(self, prefix: str) -> LinearMethod:
        if prefix in NEVER_ONLINE or skipped(prefix, self.ignore):
            return self.unquantized()
        return Int8LinearMethod(self.config.dtype, self.config.device, checkpoint=self.config.checkpoint is not None)
