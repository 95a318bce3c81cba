"""LoRAAdapter: one PEFT adapter folder, read and checked against the served model.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``.bin``). Tensors
``base_model.model.<module>.lora_A.weight`` [r, in] and ``.lora_B.weight`` [out, r] are kept per
PEFT module path on the host, B already multiplied by the scaling (alpha / r; alpha / sqrt(r)
with ``use_rslora``; r per module, so ``rank_pattern`` works). Anything that cannot be served
exactly is refused with one line naming the adapter and what does not fit.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch

from kvyard.lora.config import LoRAError
from kvyard.lora.targets import LoRATarget

_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
# PEFT options whose non-default value changes the math in a way kvyard does not serve
_REFUSED = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "alpha_pattern": {},
            "modules_to_save": None, "lora_bias": False}


@dataclass
class LoRAAdapter:
    name: str
    path: str
    rank: int                                        # the largest rank of its modules
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # PEFT module path -> (A [r, in], B [out, r] * scaling), float32 on the host
    target_modules: tuple[str, ...] = ()             # PEFT module names it touches (q_proj, ...)
    base_model: str = ""

    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.modules.values())


def load_adapter(name: str, path: str, targets: dict[str, tuple[LoRATarget, int]], max_rank: int,
                 allowed_modules: tuple[str, ...]) -> LoRAAdapter:
    """Reads and checks a PEFT folder. ``targets``: {PEFT module path: (target, shard)} of the
    model (lora.targets); ``allowed_modules``: the module names the slot pool serves."""
    cfg = _read_config(name, path)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise LoRAError(f"adapter {name!r}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    for option, default in _REFUSED.items():
        value = cfg.get(option, default)
        if value not in (default, None) and value != {} and value != []:
            raise LoRAError(f"adapter {name!r}: {option}={value!r} is not supported")
    tensors = _read_tensors(name, path)
    pairs = _pair_tensors(name, tensors)
    alpha = float(cfg.get("lora_alpha", cfg.get("r", 8)))
    rslora = bool(cfg.get("use_rslora", False))
    adapter = LoRAAdapter(name=name, path=path, rank=0, base_model=str(cfg.get("base_model_name_or_path") or ""))
    touched = []
    for module, (a, b) in sorted(pairs.items()):
        if module not in targets:
            short = module.rsplit(".", 1)[-1]
            raise LoRAError(f"adapter {name!r}: module {module} has no LoRA-capable layer in the served "
                            f"model ({short} is not a q/k/v/o/gate/up/down projection of a decoder layer, "
                            "or the layer does not exist: a different base model?)")
        target, shard = targets[module]
        short = target.shard_modules[shard]
        if short not in allowed_modules:
            raise LoRAError(f"adapter {name!r}: targets {short}, which is not among the server's "
                            f"--lora-target-modules ({', '.join(allowed_modules)})")
        r = a.shape[0]
        rows = target.layer.output_sizes[shard]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != r:
            raise LoRAError(f"adapter {name!r}: {module} lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                            "do not pair up")
        if a.shape[1] != target.layer.in_features or b.shape[0] != rows:
            raise LoRAError(f"adapter {name!r}: {module} maps {a.shape[1]} -> {b.shape[0]} features but the "
                            f"served model's layer maps {target.layer.in_features} -> {rows} (a different base model?)")
        if r > max_rank:
            raise LoRAError(f"adapter {name!r}: rank {r} of {module} exceeds --max-lora-rank {max_rank}")
        scaling = alpha / (math.sqrt(r) if rslora else r)
        adapter.modules[module] = (a.float().contiguous(), (b.float() * scaling).contiguous())
        adapter.rank = max(adapter.rank, r)
        touched.append(short)
    if not adapter.modules:
        raise LoRAError(f"adapter {name!r}: {path} holds no lora_A/lora_B weights")
    adapter.target_modules = tuple(sorted(set(touched)))
    return adapter


def _read_config(name: str, path: str) -> dict:
    file = os.path.join(path, "adapter_config.json")
    if not os.path.isdir(path):
        raise LoRAError(f"adapter {name!r}: {path} is not a folder")
    if not os.path.isfile(file):
        raise LoRAError(f"adapter {name!r}: {path} has no adapter_config.json (not a PEFT adapter folder)")
    try:
        with open(file) as fh:
            cfg = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise LoRAError(f"adapter {name!r}: adapter_config.json is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise LoRAError(f"adapter {name!r}: adapter_config.json must hold an object")
    return cfg


def _read_tensors(name: str, path: str) -> dict[str, torch.Tensor]:
    st = os.path.join(path, "adapter_model.safetensors")
    pt = os.path.join(path, "adapter_model.bin")
    try:
        if os.path.isfile(st):
            from safetensors.torch import load_file
            return load_file(st, device="cpu")
        if os.path.isfile(pt):
            state = torch.load(pt, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise ValueError("not a state dict")
            return state
    except Exception as exc:   # a truncated or foreign file: one line, never a traceback
        raise LoRAError(f"adapter {name!r}: cannot read the adapter weights: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    raise LoRAError(f"adapter {name!r}: {path} has no adapter_model.safetensors or adapter_model.bin")


def _pair_tensors(name: str, tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise LoRAError(f"adapter {name!r}: tensor {key} is not a lora_A/lora_B weight "
                            "(embedding, bias and DoRA weights are not supported)")
        found.setdefault(m.group(1), {})[m.group(2)] = value
    out = {}
    for module, ab in found.items():
        if set(ab) != {"A", "B"}:
            raise LoRAError(f"adapter {name!r}: {module} has lora_{'A' if 'A' in ab else 'B'} but not its pair")
        out[module] = (ab["A"], ab["B"])
    return out
