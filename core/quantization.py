"""QuantizationMethod: how linear layers store and multiply their weights.

A model builds every projection as ``kvyard.layers.linear.Linear``; the layer asks its
LinearMethod to create, load and apply the weight, so kept-quantized weights (GGUF, int8, fp8)
need no second model path. ``None`` (no --quantization) means UnquantizedLinearMethod.

Lifecycle of one linear layer:
  create_weights(layer)          once, at model construction (registers parameters/buffers)
  load_tensor(layer, shard, name, t)
                                 for each checkpoint tensor ``<proj>.<name>`` (name one of the
                                 method's ``checkpoint_names``, e.g. weight, weight_scale, qweight);
                                 shard indexes layer.output_sizes. ``weight`` goes to load_shard.
  process_after_loading(layer)   once, after every shard is in (repacking, transposes)
  apply(layer, x) -> y           every forward; x [..., in_features] -> y [..., out_features]
  extend_rows(layer, rows)       optional, after loading (LoRA serving): extra trailing weight
                                 rows multiplied by ``apply_extended`` in the same matmul; None
                                 (the default, every quantized method): not supported

How a method is chosen (kvyard.executor.backend_select.resolve_quantization): a checkpoint whose
config.json has ``quantization_config`` declares its method by ``quant_method``; the method
registered under that name claims it and receives the dict as ``QuantizationConfig.checkpoint``.
A float checkpoint is quantized online when --quantization names a method whose ``online`` is
true. A --quantization that contradicts the checkpoint's declaration is an error.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Optional

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from kvyard.kernels.native import NativeKernel
    from kvyard.layers.linear import Linear


@dataclass(frozen=True)
class QuantizationConfig:
    name: str
    dtype: torch.dtype     # activation dtype
    device: str
    # config.json's quantization_config when the checkpoint declares this method; None online
    checkpoint: Optional[Mapping[str, Any]] = field(default=None, compare=False, hash=False)
    options: Optional[Mapping[str, Any]] = field(default=None, compare=False, hash=False)  # e.g. torchao recipe


# Linear layers no method quantizes unless its checkpoint says otherwise: the output head
# (quantizing it costs accuracy for little memory in small models, and no format above ships it)
NEVER_ONLINE = ("lm_head",)


@dataclass(frozen=True)
class LoweredLinear:
    """A linear layer's multiply as calls C++ makes without Python (kvyard.kernels.decode_loop):
    each call is ("namespace::op[.overload]", args) run as ``op(x, *args)``; their outputs are
    concatenated along the last dim, then ``bias`` is added (None: no bias, or the call adds it).
    Valid for inputs of at most ``max_rows`` rows (None: any number)."""
    calls: tuple[tuple[str, tuple], ...]
    bias: Optional[torch.Tensor] = None
    max_rows: Optional[int] = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The same multiply from Python (a lowered step's logits): x [M, in] -> [M, out]."""
        parts = []
        for op, args in self.calls:
            namespace, name = op.split("::")
            parts.append(getattr(getattr(torch.ops, namespace), name)(x, *args))
        y = torch.cat(parts, -1) if len(parts) > 1 else parts[0]
        return y if self.bias is None else y + self.bias


class LinearMethod(ABC):
    # checkpoint tensors per projection: every one of checkpoint_names must arrive, the
    # optional ones may (activation scales of a dynamic scheme, g_idx, ...)
    checkpoint_names: tuple[str, ...] = ("weight",)
    optional_checkpoint_names: tuple[str, ...] = ()

    @abstractmethod
    def create_weights(self, layer: "Linear") -> None: ...

    @abstractmethod
    def load_shard(self, layer: "Linear", shard: int, weight: Any) -> None: ...

    def load_tensor(self, layer: "Linear", shard: int, name: str, tensor: Any) -> None:
        """A checkpoint tensor other than the weight; methods with more names override this."""
        if name != "weight":
            raise ValueError(f"{layer.prefix}: unexpected checkpoint tensor {name!r}")
        self.load_shard(layer, shard, tensor)

    def process_after_loading(self, layer: "Linear") -> None:
        pass

    @abstractmethod
    def apply(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor: ...

    def extend_rows(self, layer: "Linear", rows: int) -> Optional[torch.Tensor]:
        """Re-allocates the layer's weight with ``rows`` extra trailing output rows (zeros) that
        ``apply_extended`` multiplies in the same matmul; returns those rows [rows, in_features]
        (a view the caller writes in place), or None: this method cannot carry extra rows (a
        quantized weight), and the caller keeps its own matmul. Calling it again returns the same
        rows when ``rows`` matches."""
        return None

    def apply_extended(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        """x [T, in] -> [T, out + rows]: ``apply``'s result in the first ``out`` columns (bias on
        those only), x @ extra_rows.T after them. Only after ``extend_rows`` returned rows."""
        raise NotImplementedError(f"{type(self).__name__} carries no extra rows")

    def lower(self, layer: "Linear") -> Optional[LoweredLinear]:
        """``apply`` as dispatcher calls (same kernels, same results), or None: not lowerable, and
        models using the layer keep their Python decode step."""
        return None

    def lower_native(self, layer: "Linear") -> Optional["NativeKernel"]:
        """``lower``'s calls as kvyard_native.h linear descriptors (kvyard.kernels.native), one per
        output segment, bitwise equal to them for inputs of at most their max_rows rows; None: not
        available, and the C++ decode step keeps the dispatcher calls."""
        return None


class UnquantizedLinearMethod(LinearMethod):
    """Dense weight [sum(output_sizes), in_features] in the model dtype."""

    def __init__(self, dtype: torch.dtype, device: str | torch.device = "cpu"):
        self.dtype = dtype
        self.device = device

    def create_weights(self, layer: "Linear") -> None:
        layer.weight = torch.nn.Parameter(
            torch.empty(layer.out_features, layer.in_features, dtype=self.dtype, device=self.device),
            requires_grad=False)

    def load_shard(self, layer: "Linear", shard: int, weight: Any) -> None:
        weight = _dense(weight)
        start = sum(layer.output_sizes[:shard])
        rows = layer.output_sizes[shard]
        if tuple(weight.shape) != (rows, layer.in_features):
            raise ValueError(f"{layer.prefix}: checkpoint shape {tuple(weight.shape)} does not match "
                             f"({rows}, {layer.in_features})")
        layer.weight.data[start:start + rows].copy_(weight)

    def apply(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight, layer.bias)

    def extend_rows(self, layer: "Linear", rows: int) -> Optional[torch.Tensor]:
        """W_ext [out + rows, in]: layer.weight becomes its leading rows (a contiguous view, so
        ``apply`` and in-place weight updates are unchanged); a bias becomes the head of a
        zero-padded b_ext the same way."""
        out = layer.out_features
        ext = getattr(layer, "weight_ext", None)
        if ext is not None and ext.shape[0] == out + rows and layer.weight.data_ptr() == ext.data_ptr():
            return ext[out:]
        w = layer.weight.data
        ext = torch.zeros(out + rows, layer.in_features, dtype=w.dtype, device=w.device)
        ext[:out].copy_(w)
        layer.weight = torch.nn.Parameter(ext[:out], requires_grad=False)
        layer.weight_ext = ext
        layer.bias_ext = None
        if layer.bias is not None:
            layer.bias_ext = torch.zeros(out + rows, dtype=layer.bias.dtype, device=layer.bias.device)
            layer.bias_ext[:out].copy_(layer.bias.data)
            layer.bias = torch.nn.Parameter(layer.bias_ext[:out], requires_grad=False)
        return ext[out:]

    def apply_extended(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight_ext, layer.bias_ext)

    def lower(self, layer: "Linear") -> Optional[LoweredLinear]:
        return LoweredLinear((("aten::linear", (layer.weight, layer.bias)),))


def _dense(weight: Any) -> torch.Tensor:
    """Checkpoint tensors that know how to dequantize themselves expose ``dequantize()``."""
    if isinstance(weight, torch.Tensor):
        return weight
    if hasattr(weight, "dequantize"):
        return weight.dequantize()
    raise TypeError(f"cannot load a weight of type {type(weight).__name__}")


class QuantizationMethod(ABC):
    """A plugin kind: picks the LinearMethod for each linear layer of a model."""

    name: str = "base"
    online: bool = False   # can quantize a float checkpoint at load (--quantization NAME)

    def __init__(self, config: QuantizationConfig):
        self.config = config

    @classmethod
    def check_checkpoint(cls, quant_config: Mapping[str, Any]) -> None:
        """Raises ValueError naming the field when this method cannot serve the declared
        quantization_config (e.g. an unsupported bit width). Called before the model is built."""

    @abstractmethod
    def linear_method(self, prefix: str) -> LinearMethod:
        """The method for the linear layer named ``prefix`` (e.g. "model.layers.0.mlp.down_proj")."""

    def unquantized(self) -> LinearMethod:
        return UnquantizedLinearMethod(self.config.dtype, self.config.device)


def skipped(prefix: str, ignore: Any) -> bool:
    """Whether a checkpoint's ignore list (``ignore`` / ``modules_to_not_convert``; names,
    name suffixes or ``re:`` patterns as llm-compressor writes them) covers layer ``prefix``.
    A fused layer (qkv_proj, gate_up_proj) is covered when any of its parts is."""
    import re

    names = {prefix}
    for fused, parts in (("qkv_proj", ("q_proj", "k_proj", "v_proj")), ("gate_up_proj", ("gate_proj", "up_proj"))):
        if prefix.endswith(fused):
            names |= {prefix[: -len(fused)] + p for p in parts}
    for entry in ignore or ():
        for name in names:
            if entry.startswith("re:"):
                if re.match(entry[3:], name):
                    return True
            elif name == entry or name.endswith("." + entry) or entry in name.split("."):
                return True
    return False
