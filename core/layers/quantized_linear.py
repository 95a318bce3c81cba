"""Building blocks for quantized linear methods: fp8, int8 (w8a8) and grouped int4 weights.

The quantization plugins (fp8, w8a8_int8, awq, gptq, compressed-tensors, ...) map a checkpoint
format onto one of these; the blocks know no format by name. Each collects the checkpoint
tensors of every shard (q/k/v, gate/up) in ``load_tensor``, turns them into one canonical form in
``process_after_loading`` and multiplies in ``apply``:

  Fp8LinearMethod    weight [N, K] float8_e4m3fn with per-row scales [N] (per-channel; a
                     per-tensor scale is repeated over its shard's rows, which is exact) or
                     per-row block scales [N, ceil(K/128)] (128x128 block-scaled checkpoints).
                     Activations: dynamic per-token (per token-group of 128 for block
                     weights), static per-tensor (the largest of the shards' input scales), or
                     none (weight-only: dequantize and multiply in the layer dtype).
                     CUDA, up to GEMV_MAX_M (16) token rows, every scheme: the weight-only
                     Triton GEMV (w8a16: x stays in its dtype against the dequantized fp8
                     weight, float32 accumulation; more accurate than w8a8, as Marlin-fp8).
                     Above that: the activations quantized in one Triton launch
                     (bit-identical to quant_math), then torch._scaled_mm with row-wise scales
                     where the device has it (8.9+); block scales: the Triton block-scaled
                     GEMM. Elsewhere (the CPU) w8a8 in float32 (the fp8 values are exact).
  Int8LinearMethod   weight [N, K] int8, scales [N]; activations int8 per token (dynamic) or per
                     tensor (static); int32 accumulation (torch._int_mm), then both scales.
  Int4LinearMethod   shards arrive in the canonical int4 layout of kvyard.layers.quant_math and
                     are stored once in the kernels' layout (``int4_kernel_layout``: qweight
                     [ceil(N/4), K/8, 4], 4 outputs interleaved per 16-byte chunk; scales /
                     zeros canonical); CUDA: one autotuned Triton kernel (GEMV paths up to 16
                     token rows, a dot over 64-row blocks above); elsewhere dequantize to the
                     layer dtype and F.linear.

Every apply maps x [..., K] -> y [..., N] in x's dtype, the bias added in that dtype.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from kvyard.layers import quant_math as qm
from kvyard.quantization import LinearMethod, _dense

GEMV_MAX_M = 16   # flattened token rows up to which CUDA takes the Triton GEMV kernels


def _flat(layer, x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, layer.in_features)


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32


def _unflat(layer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    y = y if layer.bias is None else y + layer.bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], layer.out_features).to(x.dtype)


class ShardedLinearMethod(LinearMethod):
    """Collects ``layer.q_parts[shard][name]`` and hands the complete set to ``finalize``."""

    def create_weights(self, layer) -> None:
        layer.q_parts = [dict() for _ in layer.output_sizes]

    def load_shard(self, layer, shard: int, weight: Any) -> None:
        self.load_tensor(layer, shard, "weight", weight)

    def load_tensor(self, layer, shard: int, name: str, tensor: Any) -> None:
        if not 0 <= shard < len(layer.output_sizes):
            raise ValueError(f"{layer.prefix}: shard {shard} out of range for {layer.output_sizes}")
        if name not in self.checkpoint_names + self.optional_checkpoint_names:
            raise ValueError(f"{layer.prefix}: unexpected checkpoint tensor {name!r}")
        layer.q_parts[shard][name] = _dense(tensor)

    def process_after_loading(self, layer) -> None:
        for shard, parts in enumerate(layer.q_parts):
            missing = [n for n in self.checkpoint_names if n not in parts]
            if missing:
                raise ValueError(f"{layer.prefix}: shard {shard} is missing {', '.join(missing)}")
        parts, layer.q_parts = layer.q_parts, None
        self.finalize(layer, parts)

    def finalize(self, layer, parts: list[dict[str, torch.Tensor]]) -> None:
        raise NotImplementedError

    @staticmethod
    def check_shape(layer, shard: int, name: str, tensor: torch.Tensor, shape: tuple) -> None:
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{layer.prefix}: shard {shard} {name} shape {tuple(tensor.shape)} "
                             f"does not match {tuple(shape)}")

    @staticmethod
    def set_buffer(layer, name: str, tensor: Optional[torch.Tensor], device) -> None:
        layer.register_buffer(name, None if tensor is None else tensor.to(device).contiguous(),
                              persistent=False)


# -- fp8 -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fp8Scheme:
    weight: str = "channel"            # channel | tensor | block
    activation: str = "dynamic"        # dynamic | static | none
    block: tuple[int, int] = (128, 128)
    checkpoint: bool = True            # False: quantize float weights at load (per channel)
    scale_name: str = "weight_scale"   # block checkpoints: weight_scale_inv


def use_scaled_mm(x: torch.Tensor) -> bool:
    """torch._scaled_mm runs fp8 x fp8 on CUDA devices of compute capability 8.9 and above."""
    return x.is_cuda and _capability(x.device.index or 0) >= (8, 9)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


class Fp8LinearMethod(ShardedLinearMethod):
    def __init__(self, dtype: torch.dtype, device, scheme: Fp8Scheme,
                 scaled_mm: Optional[Callable[[torch.Tensor], bool]] = None):
        self.dtype, self.device, self.scheme = dtype, torch.device(device), scheme
        self.scaled_mm = scaled_mm or use_scaled_mm
        names = ("weight", scheme.scale_name) if scheme.checkpoint else ("weight",)
        if scheme.checkpoint and scheme.activation == "static":
            names += ("input_scale",)
        self.checkpoint_names = names
        self.optional_checkpoint_names = () if "input_scale" in names else ("input_scale",)

    def finalize(self, layer, parts) -> None:
        s, k = self.scheme, layer.in_features
        weights, scales = [], []
        for shard, (rows, p) in enumerate(zip(layer.output_sizes, parts)):
            w = p["weight"]
            self.check_shape(layer, shard, "weight", w, (rows, k))
            if not s.checkpoint:
                w, scale = qm.fp8_per_row(w.float())
                weights.append(w)
                scales.append(scale.view(rows))
                continue
            if w.dtype != qm.FP8_E4M3:
                raise ValueError(f"{layer.prefix}: weight dtype {w.dtype} is not float8_e4m3fn")
            scale = p[s.scale_name].float()
            if s.weight == "block":
                kb = -(-k // s.block[1])
                self.check_shape(layer, shard, s.scale_name, scale, (-(-rows // s.block[0]), kb))
                scale = qm.expand_block_scales(scale, rows, k, s.block)
            elif scale.numel() == 1:
                scale = scale.reshape(1).expand(rows)
            elif scale.numel() == rows:
                scale = scale.reshape(rows)
            else:
                raise ValueError(f"{layer.prefix}: {s.scale_name} has {scale.numel()} values; expected 1 "
                                 f"(per tensor) or {rows} (per channel)")
            weights.append(w)
            scales.append(scale)
        self.set_buffer(layer, "weight", torch.cat(weights), self.device)
        self.set_buffer(layer, "weight_scale", torch.cat(scales).float(), self.device)
        static = [p["input_scale"].float().reshape(()) for p in parts if "input_scale" in p]
        if s.activation == "static":
            # one activation scale for the fused layer: the shards' largest (never clips)
            self.set_buffer(layer, "input_scale", torch.stack(static).max(), self.device)

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        x2 = _flat(layer, x)
        s = self.scheme
        w, sw = layer.weight, layer.weight_scale
        if x2.shape[0] <= GEMV_MAX_M and (x2.is_cuda or _force_triton) and self._gemv_fits():
            # decode sizes: weight-only GEMV at copy bandwidth, no activation quantization
            from kvyard.kernels.triton_ops.fp8_gemv import fp8_w8a16_gemv
            scale_k = s.block[1] if s.weight == "block" else 0
            return _unflat(layer, x, fp8_w8a16_gemv(x2, w, sw, scale_k, _out_dtype(x)))
        if s.activation == "none":
            dense = self._dense_weight(w, sw, s).to(x.dtype)
            return _unflat(layer, x, F.linear(x2, dense))
        if s.weight == "block":
            xq, sx = qm.fp8_per_token_group(x2, s.block[1])
            if x2.is_cuda or _force_triton:
                from kvyard.kernels.triton_ops.fp8_block_gemm import fp8_block_gemm
                y = fp8_block_gemm(xq, sx, w, sw, s.block[1], torch.float32)
            else:
                y = qm.dequantize_block(xq, sx, s.block[1]) @ qm.dequantize_block(w, sw, s.block[1]).t()
            return _unflat(layer, x, y)
        xq, sx = self._quantize_input(layer, x2)
        if self.scaled_mm(x2):
            y = torch._scaled_mm(xq, w.t(), scale_a=sx.contiguous(), scale_b=sw.view(1, -1),
                                 out_dtype=_out_dtype(x))
        else:
            y = (xq.float() @ w.float().t()) * sx * sw
        return _unflat(layer, x, y)

    def _gemv_fits(self) -> bool:
        """The w8a16 GEMV serves per-row scales and power-of-two block widths >= 16."""
        bk = self.scheme.block[1]
        return self.scheme.weight != "block" or (bk >= 16 and bk & (bk - 1) == 0)

    def _quantize_input(self, layer, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x2 [M, K] -> (xq [M, K] e4m3, sx [M, 1] float32); CUDA: one Triton launch."""
        static = self.scheme.activation == "static"
        if x2.is_cuda or _force_triton:
            from kvyard.kernels.triton_ops.fp8_quant import per_token_fp8, static_fp8
            if not static:
                return per_token_fp8(x2)
            xq = static_fp8(x2, layer.input_scale)
        elif not static:
            return qm.fp8_per_row(x2)
        else:
            xq = qm.fp8_quantize(x2, layer.input_scale)
        return xq, layer.input_scale.reshape(1, 1).expand(x2.shape[0], 1)

    def dequantize(self, layer) -> torch.Tensor:
        """Dense [N, K] float32: what the stored weight and scales stand for."""
        return self._dense_weight(layer.weight, layer.weight_scale, self.scheme)

    @staticmethod
    def _dense_weight(w: torch.Tensor, sw: torch.Tensor, s: Fp8Scheme) -> torch.Tensor:
        if s.weight == "block":
            return qm.dequantize_block(w, sw, s.block[1])
        return w.float() * sw.view(-1, 1)


# -- int8 ------------------------------------------------------------------------------------
class Int8LinearMethod(ShardedLinearMethod):
    """w8a8 int8. ``checkpoint``: weight int8 + weight_scale ([rows] or [rows, 1]) per shard;
    otherwise float weights quantized per channel at load. ``static``: input_scale per shard."""

    def __init__(self, dtype: torch.dtype, device, checkpoint: bool, static: bool = False,
                 act_qmax: float = qm.INT8_MAX):
        # act_qmax: the per-token scale is amax / act_qmax: 127 (SGLang, vLLM) or 127.5
        # (compressed-tensors' symmetric rule, values clamped to [-128, 127])
        self.dtype, self.device, self.checkpoint, self.static = dtype, torch.device(device), checkpoint, static
        self.act_qmax = act_qmax
        self.checkpoint_names = ("weight", "weight_scale") + (("input_scale",) if static else ()) \
            if checkpoint else ("weight",)
        self.optional_checkpoint_names = ("input_zero_point",) if static else ()

    def finalize(self, layer, parts) -> None:
        weights, scales, static = [], [], []
        for shard, (rows, p) in enumerate(zip(layer.output_sizes, parts)):
            w = p["weight"]
            self.check_shape(layer, shard, "weight", w, (rows, layer.in_features))
            if self.checkpoint:
                if w.dtype != torch.int8:
                    raise ValueError(f"{layer.prefix}: weight dtype {w.dtype} is not int8")
                scale = p["weight_scale"].float().reshape(-1)
                scale = scale.expand(rows) if scale.numel() == 1 else scale
                self.check_shape(layer, shard, "weight_scale", scale, (rows,))
                zp = p.get("input_zero_point")
                if zp is not None and bool((zp != 0).any()):
                    raise ValueError(f"{layer.prefix}: asymmetric int8 activations (input_zero_point) "
                                     "are not supported yet")
            else:
                w, scale = qm.int8_per_row(w.float())
                scale = scale.view(rows)
            weights.append(w)
            scales.append(scale)
            if self.static:
                static.append(p["input_scale"].float().reshape(()))
        self.set_buffer(layer, "weight", torch.cat(weights), self.device)
        self.set_buffer(layer, "weight_scale", torch.cat(scales), self.device)
        if self.static:
            self.set_buffer(layer, "input_scale", torch.stack(static).max(), self.device)

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        x2 = _flat(layer, x)
        if self.static:
            xq, sx = qm.int8_static(x2, layer.input_scale), layer.input_scale
        else:
            xq, sx = qm.int8_per_row(x2, self.act_qmax)
        acc = qm.int_mm(xq, layer.weight.t())                       # [M, N] int32
        return _unflat(layer, x, acc.float() * sx * layer.weight_scale)

    def dequantize(self, layer) -> torch.Tensor:
        return layer.weight.float() * layer.weight_scale.view(-1, 1)


# -- int4 ------------------------------------------------------------------------------------
@dataclass
class Int4Shard:
    """One shard in the canonical layout (quant_math): qweight [K/8, rows] int32, scales
    [G, rows], zeros [G, rows] uint8, g_idx [K] int32."""
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor


INT4_ROWS = 4   # outputs interleaved per 16-byte chunk of the kernel layout


def int4_kernel_layout(qweight: torch.Tensor, scales: torch.Tensor,
                       zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Canonical (qweight [K/8, N], scales [G, N], zeros [G, N]) -> the Triton kernels' layout
    (kvyard.kernels.triton_ops.int4_gemm): qweight [ceil(N/4), K/8, 4] with [r, j, i] = word j
    of output 4r + i (the words themselves unchanged; outputs past N are zero words); scales
    and zeros stay canonical. The same bytes as the canonical qweight (plus the padding)."""
    k8, n = qweight.shape
    pad = -n % INT4_ROWS
    q = torch.nn.functional.pad(qweight, (0, pad)) if pad else qweight
    q = q.reshape(k8, (n + pad) // INT4_ROWS, INT4_ROWS).permute(1, 0, 2).contiguous()
    return q, scales.contiguous(), zeros.contiguous()


def int4_canonical_qweight(qweight: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of int4_kernel_layout's qweight: [ceil(N/4), K/8, 4] -> [K/8, N]."""
    n4, k8, rows = qweight.shape
    return qweight.permute(1, 0, 2).reshape(k8, n4 * rows)[:, :n]


class Int4LinearMethod(ShardedLinearMethod):
    """Grouped 4-bit weights; subclasses (in the format plugins) convert a shard's checkpoint
    tensors with ``to_canonical``."""

    def __init__(self, dtype: torch.dtype, device, group_size: int):
        self.dtype, self.device, self.group_size = dtype, torch.device(device), group_size

    def to_canonical(self, layer, shard: int, rows: int, parts: dict[str, torch.Tensor]) -> Int4Shard:
        raise NotImplementedError

    def finalize(self, layer, parts) -> None:
        k = layer.in_features
        if k % 8 or k % self.group_size:
            raise ValueError(f"{layer.prefix}: in_features {k} is not a multiple of 8 and of the "
                             f"group size {self.group_size}")
        shards = [self.to_canonical(layer, i, rows, p) for i, (rows, p) in enumerate(zip(layer.output_sizes, parts))]
        for i, sh in enumerate(shards):
            self.check_shape(layer, i, "qweight (canonical)", sh.qweight, (k // 8, layer.output_sizes[i]))
            if not torch.equal(sh.g_idx, shards[0].g_idx):
                raise ValueError(f"{layer.prefix}: shards have different g_idx; fused layers need one order")
        qweight, scales, zeros = int4_kernel_layout(torch.cat([s.qweight for s in shards], 1),
                                                    torch.cat([s.scales for s in shards], 1).to(self.dtype),
                                                    torch.cat([s.zeros for s in shards], 1).to(torch.uint8))
        self.set_buffer(layer, "qweight", qweight, self.device)
        self.set_buffer(layer, "scales", scales, self.device)
        self.set_buffer(layer, "zeros", zeros, self.device)
        self.set_buffer(layer, "g_idx", shards[0].g_idx.to(torch.int32), self.device)
        # group size when g_idx is k // group (the kernel then reads scales by row); 0: gather
        seq = torch.arange(k, dtype=torch.int32) // self.group_size
        layer.int4_group = self.group_size if torch.equal(shards[0].g_idx.cpu().to(torch.int32), seq) else 0

    def dequantize(self, layer) -> torch.Tensor:
        """Dense [N, K] in the layer dtype."""
        qweight = int4_canonical_qweight(layer.qweight, layer.scales.shape[1])
        return qm.dequantize_int4(qweight, layer.scales, layer.zeros, layer.g_idx, self.dtype)

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        x2 = _flat(layer, x)
        if x2.is_cuda or _force_triton:
            from kvyard.kernels.triton_ops.int4_gemm import int4_gemm
            y = int4_gemm(x2, layer.qweight, layer.scales, layer.zeros, layer.g_idx, layer.int4_group)
        else:
            y = F.linear(x2.to(self.dtype), self.dequantize(layer))
        return _unflat(layer, x, y)


_force_triton = False   # tests: the Triton GEMMs on CPU tensors under TRITON_INTERPRET=1


def force_triton(on: bool) -> None:
    global _force_triton
    _force_triton = on


class OnlineInt4LinearMethod(Int4LinearMethod):
    """Float weights quantized at load by round-to-nearest (no calibration): symmetric,
    ``group_size`` inputs per scale. For trying int4 speed on float checkpoints (and dummy
    weights in benchmarks); calibrated checkpoints (GPTQ, AWQ) are more accurate."""
    checkpoint_names = ("weight",)

    def to_canonical(self, layer, shard: int, rows: int, parts: dict[str, torch.Tensor]) -> Int4Shard:
        w = parts["weight"]
        self.check_shape(layer, shard, "weight", w, (rows, layer.in_features))
        q, scale, zero = qm.quantize_int4(w.float(), self.group_size, symmetric=True)
        g_idx = torch.arange(layer.in_features, dtype=torch.int32, device=w.device) // self.group_size
        return Int4Shard(qm.pack_int4_rows(q.t().contiguous()), scale.t(), zero.t(), g_idx)
