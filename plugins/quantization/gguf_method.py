"""GGUFQuantization: linear layers keep their GGUF blocks and multiply them in place.

Lifecycle of one layer (see kvyard.quantization):
  load_shard      each part (q/k/v, gate/up, or the one weight) arrives as a
                  kvyard.loader.QuantizedTensor (uint8 [rows, bytes_per_row]) or, for F32/F16/BF16
                  and formats the kernels lack, as floats; parts may differ in type.
  process_after_loading
                  consecutive parts of one type are concatenated into one segment (rows are
                  independent), legacy formats are repacked to the int kernel's layout (planar,
                  or 16-row interleaved tiles on AVX-512 VNNI; same bytes; gguf_kernels.prepare),
                  and each segment becomes a buffer ``gguf_weight_<i>`` on the layer.
  apply           one kernel call per segment; outputs are concatenated along the last dim.

Memory: a quantized segment holds exactly the file's bytes. Types the kernels do not multiply
are dequantized at load to the layer dtype (logged once per type).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import gguf
import torch
import torch.nn.functional as F

from kvyard.kernels.native import NativeKernel
from kvyard.quantization import LinearMethod, LoweredLinear, QuantizationConfig, QuantizationMethod
from kvyard_plugins.quantization import gguf_kernels

logger = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
COMPUTE_DTYPES = (torch.float32, torch.bfloat16)

_warned_fallback: set[str] = set()   # type names already logged as dequantized at load


@dataclass(frozen=True)
class Segment:
    """Output rows [start, start + rows) of a layer, multiplied by one kernel call.

    ``kernel_qtype`` is the layout id the kernels take (gguf_kernels.prepare); None means a
    dense weight in the layer dtype. ``buffer`` names the layer buffer holding it."""
    start: int
    rows: int
    kernel_qtype: Optional[int]
    file_qtype: str
    buffer: str


class GGUFLinearMethod(LinearMethod):
    def __init__(self, dtype: torch.dtype, device: str | torch.device = "cpu"):
        self.dtype = dtype
        self.device = torch.device(device)

    # -- loading --------------------------------------------------------------------------------
    def create_weights(self, layer) -> None:
        layer.gguf_parts = [None] * len(layer.output_sizes)   # (kind, tensor) per shard; kind:
        # the file type name, or "dense" for float weights
        layer.gguf_segments = ()

    def load_shard(self, layer, shard: int, weight: Any) -> None:
        if not 0 <= shard < len(layer.output_sizes):
            raise ValueError(f"{layer.prefix}: shard {shard} out of range for output_sizes "
                             f"{layer.output_sizes}")
        rows, cols = layer.output_sizes[shard], layer.in_features
        if _is_quantized(weight):
            layer.gguf_parts[shard] = self._quantized_part(layer, weight, rows, cols)
            return
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"{layer.prefix}: cannot load a weight of type {type(weight).__name__}")
        if tuple(weight.shape) != (rows, cols):
            raise ValueError(f"{layer.prefix}: shard {shard} shape {tuple(weight.shape)} does not "
                             f"match ({rows}, {cols})")
        layer.gguf_parts[shard] = ("dense", weight.to(self.dtype))

    def _quantized_part(self, layer, weight: Any, rows: int, cols: int) -> tuple[str, torch.Tensor]:
        qtype = Q(int(weight.qtype))
        if tuple(weight.shape) != (rows, cols):
            raise ValueError(f"{layer.prefix}: quantized weight shape {tuple(weight.shape)} does "
                             f"not match ({rows}, {cols})")
        if qtype in FLOAT_TYPES or qtype not in gguf_kernels.SUPPORTED or not gguf_kernels.available():
            if qtype not in FLOAT_TYPES and qtype.name not in _warned_fallback:
                _warned_fallback.add(qtype.name)
                logger.warning("gguf: no CPU kernel for %s; such weights are dequantized at load "
                               "to %s", qtype.name, self.dtype)
            return "dense", weight.dequantize(self.dtype)
        data = weight.data
        expected = gguf_kernels.bytes_per_row(qtype, cols)
        if data.dtype != torch.uint8 or data.numel() != rows * expected:
            raise ValueError(f"{layer.prefix}: {qtype.name} data holds {data.numel()} "
                             f"{data.dtype} values, expected uint8 {rows} x {expected}")
        return qtype.name, data.reshape(rows, expected).contiguous()

    def process_after_loading(self, layer) -> None:
        missing = [i for i, part in enumerate(layer.gguf_parts) if part is None]
        if missing:
            raise ValueError(f"{layer.prefix}: shards {missing} were never loaded")
        segments, start = [], 0
        for kind, tensors in _runs(layer.gguf_parts):
            rows = sum(t.shape[0] for t in tensors)
            name = f"gguf_weight_{len(segments)}"
            tensor = tensors[0] if len(tensors) == 1 else torch.cat(tensors)
            kernel_qtype = None
            if kind != "dense":
                tensor, kernel_qtype = gguf_kernels.prepare(tensor, Q[kind], layer.in_features)
            layer.register_buffer(name, tensor.to(self.device), persistent=False)
            segments.append(Segment(start, rows, kernel_qtype, kind, name))
            start += rows
        layer.gguf_segments = tuple(segments)
        layer.gguf_parts = None

    # -- forward --------------------------------------------------------------------------------
    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features] in x's dtype. Kept lean: it runs for
        every projection of every step."""
        flat = x.dim() == 2
        x2 = x if flat else x.reshape(-1, layer.in_features)
        if x2.dtype not in COMPUTE_DTYPES:
            x2 = x2.float()
        segments = layer.gguf_segments
        if len(segments) == 1:
            y = self._segment(layer, segments[0], x2, layer.bias)
        else:
            y = torch.cat([self._segment(layer, seg, x2, None) for seg in segments], dim=-1)
            if layer.bias is not None:
                y = y + layer.bias.to(y.dtype)
        if not flat:
            y = y.reshape(*x.shape[:-1], layer.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def lower(self, layer) -> Optional[LoweredLinear]:
        """The decode step's ``apply`` in the layer dtype, on the int kernel for up to
        ``gguf_kernels.decode_int_max_rows`` rows of its layouts: one call per segment, the bias in
        the call when there is one segment."""
        if self.dtype not in COMPUTE_DTYPES or not gguf_kernels.available():
            return None
        gguf_kernels.load()
        one = len(layer.gguf_segments) == 1
        calls = []
        for seg in layer.gguf_segments:
            weight, bias = layer._buffers[seg.buffer], layer.bias if one else None
            if seg.kernel_qtype is None:
                calls.append(("aten::linear", (weight.to(self.dtype), None if bias is None else bias.to(self.dtype))))
            else:
                calls.append(("kvyard_gguf::mm_int", (weight, seg.kernel_qtype, layer.in_features, bias)))
        bias = None if one or layer.bias is None else layer.bias.to(self.dtype)
        return LoweredLinear(tuple(calls), bias, max_rows=_decode_max_rows(layer))

    def lower_native(self, layer) -> Optional[NativeKernel]:
        """``lower``'s int-kernel calls as native descriptors (the same activation quantization
        and row kernels), where every segment is kept quantized and a bias, if any, sits in the
        one segment's call."""
        if self.dtype not in COMPUTE_DTYPES or not gguf_kernels.available():
            return None
        segments = layer.gguf_segments
        if any(seg.kernel_qtype is None for seg in segments) or (len(segments) > 1 and layer.bias is not None):
            return None
        gguf_kernels.load()
        descriptors, keep = [], []
        for seg in segments:
            weight = layer._buffers[seg.buffer]
            desc, bias32 = torch.ops.kvyard_gguf.native_linear(weight, seg.kernel_qtype, layer.in_features, layer.bias,
                                                               self.dtype, _decode_max_rows(layer))
            descriptors.append(desc.data_ptr())
            keep += [desc, bias32, weight]
        return NativeKernel(tuple(descriptors), tuple(keep))

    @staticmethod
    def _segment(layer, seg: Segment, x2: torch.Tensor,
                 bias: Optional[torch.Tensor]) -> torch.Tensor:
        weight = layer._buffers[seg.buffer]     # direct: nn.Module.__getattr__ is slow
        if seg.kernel_qtype is None:
            return F.linear(x2, weight.to(x2.dtype), None if bias is None else bias.to(x2.dtype))
        return gguf_kernels.matmul(x2, weight, seg.kernel_qtype, layer.in_features, bias)


class GGUFQuantization(QuantizationMethod):
    """--quantization gguf: GGUF weights kept quantized, multiplied on the CPU."""

    name = "gguf"

    def __init__(self, config: QuantizationConfig):
        super().__init__(config)
        if torch.device(config.device).type != "cpu":
            raise ValueError(f"device: gguf quantization runs on the CPU only, got {config.device!r}")

    def linear_method(self, prefix: str) -> LinearMethod:
        return GGUFLinearMethod(self.config.dtype, self.config.device)


def _is_quantized(weight: Any) -> bool:
    """A kvyard.loader.QuantizedTensor (or anything shaped like one)."""
    return all(hasattr(weight, a) for a in ("data", "shape", "qtype", "dequantize")) and \
        not isinstance(weight, torch.Tensor)


def _runs(parts: list[tuple[str, torch.Tensor]]) -> list[tuple[str, list[torch.Tensor]]]:
    """Consecutive parts of the same kind ("dense" or a type name), in shard order."""
    runs: list[tuple[str, list[torch.Tensor]]] = []
    for kind, tensor in parts:
        if runs and runs[-1][0] == kind:
            runs[-1][1].append(tensor)
        else:
            runs.append((kind, [tensor]))
    return runs


def _decode_max_rows(layer) -> int:
    """The rows a decode step's lowered calls of ``layer`` serve: the int kernel's decode range of
    its quantized segments' layouts (the prefill range where none is kept quantized)."""
    rows = [gguf_kernels.decode_int_max_rows(seg.kernel_qtype) for seg in layer.gguf_segments
            if seg.kernel_qtype is not None]
    return min(rows, default=gguf_kernels.DENSE_MIN_M - 1)
