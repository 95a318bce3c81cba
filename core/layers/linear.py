"""Linear: one projection, or several fused along the output dim (qkv, gate_up).

``output_sizes`` lists the fused outputs in order, so a checkpoint's q_proj/k_proj/v_proj load
as shards 0/1/2 of one qkv layer. Storage and matmul belong to the LinearMethod (quantization.py).

Tensor parallelism (``parallel``: kvyard.layers.parallel): the constructor takes the full sizes,
the layer keeps this rank's (``output_sizes``, ``in_features``; the full ones stay in
``full_output_sizes`` / ``full_in_features``), every checkpoint entry is sliced before the
LinearMethod sees it, and a row-parallel layer all-reduces its output.
``lora_hook`` (None unless LoRA serving attached one: kvyard.lora) runs after that matmul,
whatever the method computed: ``y = hook(x, y)``; or, when its method carries extra weight rows
(``LinearMethod.extend_rows``) and the layer is not row-parallel, instead of it
(``hook.forward_fused``: the adapters' A rows ride in the base GEMM; the output is then a
row-strided view, which every consumer of a LoRA target's output accepts).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from kvyard.distributed import SINGLE, Shard
from kvyard.distributed.collectives import all_reduce
from kvyard.distributed.shard import take
from kvyard.layers.parallel import ColumnParallel, RowParallel
from kvyard.quantization import LinearMethod, UnquantizedLinearMethod


class Linear(nn.Module):
    def __init__(self, in_features: int, output_sizes: int | Sequence[int], bias: bool = False,
                 method: Optional[LinearMethod] = None, prefix: str = "",
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 parallel: ColumnParallel | RowParallel | None = None):
        super().__init__()
        self.prefix = prefix
        self.full_in_features = in_features
        self.full_output_sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
        self.out_shards: Optional[list[Shard]] = None   # column-parallel: this rank's rows per output
        self.in_shard: Optional[Shard] = None           # row-parallel: this rank's input columns
        self.reduce_tp = None                           # row-parallel with reduce: its TensorParallel
        self.tp = SINGLE
        if parallel is not None and parallel.tp.enabled:
            self.tp = parallel.tp
            if isinstance(parallel, ColumnParallel):
                self.out_shards = parallel.out_shards(self.full_output_sizes, prefix)
            else:
                self.in_shard = parallel.in_shard(in_features, prefix)
                self.reduce_tp = parallel.tp if parallel.reduce else None
        self.in_features = self.in_shard.size if self.in_shard else in_features
        self.output_sizes = ([s.size for s in self.out_shards] if self.out_shards
                             else list(self.full_output_sizes))
        self.out_features = sum(self.output_sizes)
        self.method = method or UnquantizedLinearMethod(dtype, device)
        self.bias = (nn.Parameter(torch.zeros(self.out_features, dtype=dtype, device=device),
                                  requires_grad=False) if bias else None)
        self.method.create_weights(self)
        self.lora_hook = None   # kvyard.lora.hook.LoRAHook when LoRA serving targets this layer

    def load_shard(self, shard: int, weight: Any) -> None:
        """weight [full rows of shard, full in_features]: this rank's slice goes to the method."""
        self.method.load_shard(self, shard, self._local(shard, weight, "weight"))

    def load_tensor(self, shard: int, name: str, tensor: Any) -> None:
        """Checkpoint tensor ``<part>.<name>`` (weight, weight_scale, qweight, ...) of shard."""
        self.method.load_tensor(self, shard, name, self._local(shard, tensor, name))

    def _local(self, shard: int, entry: Any, name: str) -> Any:
        """This rank's slice of a checkpoint entry: rows (column-parallel) or columns
        (row-parallel) of a weight; per-output-row scales follow the rows; scalars and
        per-output-row scales of a row-parallel layer are whole on every rank. Layouts the
        split cannot follow (packed transposed weights) are refused by name."""
        if self.out_shards is None and self.in_shard is None:
            return entry
        label = f"{self.prefix}.{name}"
        shape = tuple(entry.shape)
        if len(shape) == 0 or (name != "weight" and max(shape) == 1):
            return entry
        if self.out_shards is not None and shape[0] == self.out_shards[shard].full:
            return take(entry, 0, self.out_shards[shard], label)
        if self.in_shard is not None and len(shape) == 2 and shape[1] == self.in_shard.full:
            return take(entry, 1, self.in_shard, label)
        if self.in_shard is not None and name != "weight" and (len(shape) == 1 or shape[-1] == 1):
            return entry   # per-output-row scales: a row-parallel layer keeps every output row
        raise ValueError(f"{label}: tensor parallelism cannot split a checkpoint entry of shape {shape} "
                         f"with {type(self.method).__name__} (not supported yet)")

    def checkpoint_targets(self, parts: Sequence[str]) -> tuple[dict, dict]:
        """(required, optional) maps from checkpoint names to loaders. ``parts`` are the
        checkpoint prefixes of the shards in order (e.g. "...q_proj", "...k_proj", "...v_proj");
        the bias is required when the layer has one."""
        from functools import partial

        required, optional = {}, {}
        for shard, part in enumerate(parts):
            for name in self.method.checkpoint_names:
                required[f"{part}.{name}"] = partial(self.load_tensor, shard, name)
            for name in self.method.optional_checkpoint_names:
                optional[f"{part}.{name}"] = partial(self.load_tensor, shard, name)
            if self.bias is not None:
                required[f"{part}.bias"] = partial(self.load_bias_shard, shard)
        return required, optional

    def load_bias_shard(self, shard: int, bias: Any) -> None:
        """bias [output_sizes[shard]]: a tensor or anything with ``dequantize()``."""
        if self.bias is None:
            raise ValueError(f"{self.prefix}: the checkpoint has a bias but the layer was built without one")
        bias = bias if isinstance(bias, torch.Tensor) else bias.dequantize()
        if self.out_shards is not None:
            bias = take(bias, 0, self.out_shards[shard], f"{self.prefix}.bias")
        if self.in_shard is not None and self.tp.rank != 0:
            return   # row-parallel: the bias is added once, by rank 0 (the others keep zeros)
        rows = self.output_sizes[shard]
        if tuple(bias.shape) != (rows,):
            raise ValueError(f"{self.prefix}: checkpoint bias shape {tuple(bias.shape)} does not match ({rows},)")
        start = sum(self.output_sizes[:shard])
        self.bias.data[start:start + rows].copy_(bias)

    def process_after_loading(self) -> None:
        self.method.process_after_loading(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora_hook is not None and self.lora_hook.fused:
            return self.lora_hook.forward_fused(self, x)   # one GEMM: base rows + adapter A rows
        y = self.method.apply(self, x)
        if self.reduce_tp is not None:
            y = all_reduce(y, self.reduce_tp)
        return y if self.lora_hook is None else self.lora_hook(x, y)

    def split(self, y: torch.Tensor) -> list[torch.Tensor]:
        return list(y.split(self.output_sizes, dim=-1))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.output_sizes}, method={type(self.method).__name__}"


def process_linears_after_loading(model: nn.Module) -> None:
    """Every Linear of ``model`` finishes loading (repacking, scales): call once all weights are in."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.process_after_loading()
