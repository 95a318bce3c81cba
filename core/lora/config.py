"""LoRAConfig: the LoRA flags as one frozen config, and --lora-paths parsing.

--lora-paths entries follow SGLang: ``PATH`` (named after its folder), ``NAME=PATH``, or a JSON
object ``{"lora_name": ..., "lora_path": ..., "pinned": ...}`` (``pinned`` is accepted; every
adapter stays loaded on the host until unloaded).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterable, Optional

# PEFT module names a slot can serve; fused kvyard layers take them by shard
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED_ALIASES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
LORA_BACKENDS = ("auto", "triton", "torch")


class LoRAError(ValueError):
    """A one-line refusal naming the adapter and what does not fit."""


@dataclass(frozen=True)
class LoRAConfig:
    max_loras_per_batch: int = 8
    max_lora_rank: int = 64
    target_modules: tuple[str, ...] = TARGET_MODULES
    backend: str = "torch"                       # resolved: triton | torch
    adapters: tuple[tuple[str, str], ...] = ()   # (name, path) loaded at start

    def __post_init__(self):
        if self.max_loras_per_batch < 1:
            raise LoRAError(f"max_loras_per_batch must be >= 1, got {self.max_loras_per_batch}")
        if self.max_lora_rank < 1:
            raise LoRAError(f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        if self.backend not in ("triton", "torch"):
            raise LoRAError(f"lora_backend must be triton or torch, got {self.backend!r}")


def parse_lora_paths(entries: Optional[Iterable]) -> dict[str, str]:
    """--lora-paths entries (or an Engine's dict / list) -> {name: path}, in order."""
    if entries is None:
        return {}
    if isinstance(entries, dict):
        items = list(entries.items())
    else:
        items = [_parse_entry(e) for e in ([entries] if isinstance(entries, str) else entries)]
    out: dict[str, str] = {}
    for name, path in items:
        if not isinstance(name, str) or not name or ":" in name:
            raise LoRAError(f"lora_paths: adapter name {name!r} must be a non-empty string without ':'")
        if name in out:
            raise LoRAError(f"lora_paths: adapter name {name!r} is given twice")
        out[name] = str(path)
    return out


def _parse_entry(entry) -> tuple[str, str]:
    if isinstance(entry, dict):
        return _from_json(entry)
    text = str(entry).strip()
    if text.startswith("{"):
        try:
            return _from_json(json.loads(text))
        except json.JSONDecodeError as exc:
            raise LoRAError(f"lora_paths: {text!r} is not valid JSON: {exc}") from None
    if "=" in text:
        name, path = text.split("=", 1)
        return name.strip(), path.strip()
    return os.path.basename(os.path.normpath(text)), text


def _from_json(obj: dict) -> tuple[str, str]:
    if not isinstance(obj, dict) or "lora_name" not in obj or "lora_path" not in obj:
        raise LoRAError('lora_paths: a JSON entry needs "lora_name" and "lora_path"')
    return obj["lora_name"], obj["lora_path"]


def normalize_target_modules(names: Optional[Iterable[str]]) -> Optional[tuple[str, ...]]:
    """--lora-target-modules -> PEFT module names (``all`` = every supported one); None: unset."""
    if names is None:
        return None
    out: list[str] = []
    for name in names:
        expanded = TARGET_MODULES if name == "all" else FUSED_ALIASES.get(name, (name,))
        for n in expanded:
            if n not in TARGET_MODULES:
                raise LoRAError(f"lora_target_modules: {n!r} is not supported; choose from "
                                f"{', '.join(TARGET_MODULES + tuple(FUSED_ALIASES))}, all")
            if n not in out:
                out.append(n)
    return tuple(out)


def peek_adapter(name: str, path: str) -> tuple[int, tuple[str, ...]]:
    """(rank, target module names) from a PEFT folder's adapter_config.json alone: the defaults
    of --max-lora-rank and --lora-target-modules. A missing or malformed file is a LoRAError."""
    file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(file):
        raise LoRAError(f"adapter {name!r}: {path} has no adapter_config.json (not a PEFT adapter folder)")
    try:
        with open(file) as fh:
            cfg = json.load(fh)
        ranks = [int(cfg.get("r", 8))] + [int(v) for v in (cfg.get("rank_pattern") or {}).values()]
        mods = cfg.get("target_modules") or ()
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise LoRAError(f"adapter {name!r}: adapter_config.json is not a PEFT LoRA config: {exc}") from None
    mods = (mods,) if isinstance(mods, str) else tuple(mods)
    known = TARGET_MODULES + tuple(FUSED_ALIASES)
    return max(ranks), tuple(m.rsplit(".", 1)[-1] for m in mods if m.rsplit(".", 1)[-1] in known)
