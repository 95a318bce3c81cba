"""WeightLoader: the load-format plugin kind (safetensors, pt, gguf, dummy, ...).

A loader turns a --model-path into three things: the HF config, where the tokenizer comes from,
and a stream of (HF parameter name, tensor) pairs that the model's ``load_weights`` consumes.
A tensor may be a plain torch.Tensor or an object with ``dequantize()`` (kept-quantized GGUF
blocks); the linear layer's LinearMethod decides what to do with it.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

# Path helpers a load-format plugin may use (the plugin API; they live in kvyard.model.source).
from kvyard.model.source import default_model_path, gguf_file_of, pt_files, safetensors_files  # noqa: F401


@dataclass(frozen=True)
class LoadConfig:
    load_format: str = "auto"
    revision: Optional[str] = None
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    trust_remote_code: bool = False
    json_model_override_args: str = ""    # JSON merged into the HF config
    keep_quantized: bool = False          # GGUF: hand out quantized blocks instead of floats
    lazy_slices: bool = False             # tensor parallelism: hand out LazyTensors where the format
                                          # can read a slice alone (each rank reads only its slices)


@dataclass(frozen=True)
class TokenizerSource:
    path: str
    kwargs: dict


class WeightLoader(ABC):
    name: str = "base"

    def __init__(self, config: LoadConfig):
        self.config = config

    @classmethod
    @abstractmethod
    def can_load(cls, model_path: str) -> bool:
        """Whether this format recognises the path (used by --load-format auto)."""

    @abstractmethod
    def hf_config(self, model_path: str) -> Any:
        """A transformers PretrainedConfig (overrides not yet applied)."""

    def tokenizer_source(self, model_path: str) -> TokenizerSource:
        return TokenizerSource(model_path, {})

    @abstractmethod
    def weights(self, model_path: str, hf_config: Any) -> Iterator[tuple[str, Any]]:
        """(HF parameter name, tensor) pairs in checkpoint order."""

    def quantization(self) -> Optional[str]:
        """The --quantization this format implies when the user gave none."""
        return None


@dataclass
class QuantizedTensor:
    """A checkpoint tensor kept in its quantized block format (GGUF/ggml).

    ``data`` is the raw block bytes as a uint8 tensor [rows, bytes_per_row]; ``shape`` is the
    logical (rows, cols) float shape in PyTorch orientation (out_features, in_features);
    ``qtype`` is a ``gguf.GGMLQuantizationType`` value.
    """
    data: torch.Tensor
    shape: tuple[int, int]
    qtype: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        import gguf
        import numpy as np

        raw = self.data.cpu().numpy()
        values = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(self.qtype))
        return torch.from_numpy(np.ascontiguousarray(values)).reshape(self.shape).to(dtype)


@dataclass
class LazyTensor:
    """A checkpoint tensor not read yet (safetensors under tensor parallelism): ``narrow`` reads
    only a slice from the file, ``dequantize`` the whole tensor. ``cast`` is applied to what is
    read (the loader's dtype rule)."""
    source: Any                    # safetensors' PySafeSlice
    shape: tuple[int, ...]
    cast: Any = None

    def narrow(self, dim: int, start: int, size: int) -> torch.Tensor:
        index = tuple(slice(None) for _ in range(dim)) + (slice(start, start + size),)
        return self._cast(self.source[index])

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return self._cast(self.source[...])

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.cast(tensor) if self.cast is not None else tensor
