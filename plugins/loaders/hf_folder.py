"""What the folder-based formats (safetensors, pt, dummy) share: an HF folder with config.json."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kvyard.loader import TokenizerSource, WeightLoader


class HFFolderLoader(WeightLoader):
    """An HF model folder: config.json (+ tokenizer files) beside the weights."""

    def hf_config(self, model_path: str) -> Any:
        from transformers import AutoConfig

        if not (Path(model_path) / "config.json").is_file():
            raise ValueError(f"model_path: {model_path} has no config.json")
        return AutoConfig.from_pretrained(model_path, revision=self.config.revision,
                                          trust_remote_code=self.config.trust_remote_code)

    def tokenizer_source(self, model_path: str) -> TokenizerSource:
        return TokenizerSource(model_path, {"revision": self.config.revision,
                                            "trust_remote_code": self.config.trust_remote_code})

    def cast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Floating-point tensors go to LoadConfig.dtype; integer ones (packed quantized
        weights, scales' indices) keep their dtype. With LoadConfig.keep_quantized (a
        quantization method serves the model) every tensor stays as stored: fp8 weights and
        float32 scales reach the method unrounded, and the model's copies cast the rest."""
        if self.config.keep_quantized or not tensor.is_floating_point():
            return tensor
        return tensor.to(self.config.dtype)


def is_model_weight(name: str) -> bool:
    """Old checkpoints carry the rotary inverse frequencies, a buffer and no parameter."""
    return not name.endswith("rotary_emb.inv_freq")
