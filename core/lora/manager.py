"""LoRAManager: the scheduler process's adapters, their slots, and the hooks in the model.

Adapters (host tensors) are kept by name until unloaded; each load gets a fresh ``uid`` (the
prefix-cache namespace of its requests). Slots are filled on demand by ``acquire`` (called by
the scheduler when it admits a request) and pinned until ``release``; a slot whose adapter no
admitted request uses is evicted least-recently-used first. ``acquire`` returns None when every
slot is pinned by other adapters: the scheduler then holds the request back this step.
"""
from __future__ import annotations

import itertools
import logging
from typing import Optional

import torch
from torch import nn

from kvyard.lora.adapter import LoRAAdapter, load_adapter
from kvyard.lora.batch import LoRABatchInfo, build_batch_info
from kvyard.lora.config import TARGET_MODULES, LoRAConfig, LoRAError
from kvyard.lora.hook import LoRAHook, LoRARuntime
from kvyard.lora.pool import LoRASlotPool
from kvyard.lora.targets import find_targets, targets_by_peft_name

logger = logging.getLogger(__name__)

BASE_SLOT = -1


class LoRAManager:
    def __init__(self, config: LoRAConfig, model: nn.Module, dtype: torch.dtype, device):
        self.config = config
        self.device = device
        self.runtime = LoRARuntime(config.backend)
        targets = find_targets(model, config.target_modules)
        if not targets:
            raise LoRAError(f"enable_lora: the model has no layer LoRA can target among "
                            f"{', '.join(config.target_modules)}")
        self.pool = LoRASlotPool(targets, config.max_loras_per_batch, config.max_lora_rank, dtype, device)
        self.attach(model)
        self._uids = itertools.count(1)
        self.adapters: dict[str, LoRAAdapter] = {}
        self.uid: dict[str, int] = {}
        self.slot_of: dict[str, int] = {}                   # adapters in a slot
        self.owner: list[Optional[str]] = [None] * config.max_loras_per_batch
        self.pins = [0] * config.max_loras_per_batch        # admitted requests per slot
        self.last_used = [0] * config.max_loras_per_batch
        self._clock = itertools.count(1)
        self.requests: dict[str, int] = {}                  # requests served per adapter (metrics)
        for name, path in config.adapters:
            self.load(name, path)
        logger.info("LoRA: %d slots of rank %d over %d layers (%.1f MiB), backend %s, adapters %s",
                    config.max_loras_per_batch, config.max_lora_rank, len(self.targets),
                    self.pool.nbytes() / 2**20, config.backend, list(self.adapters) or "none yet")

    def attach(self, model: nn.Module) -> None:
        """Hooks every target Linear of ``model`` to its slot buffers (again after a weight
        update swapped the model object). Where the backend fuses and the layer's method carries
        extra rows, the layer's A moves into its weight's tail (contents kept) first."""
        targets = find_targets(model, self.config.target_modules)
        if set(targets) != set(self.pool.a):
            raise LoRAError("enable_lora: the model's LoRA layers differ from the slot pool's")
        self.targets = targets
        # every LoRA-capable layer by PEFT name: an adapter of a module outside the slots is named as such
        self.by_peft = targets_by_peft_name(find_targets(model, TARGET_MODULES))
        fused = 0
        for key, t in targets.items():
            rows = self._extra_rows(t.layer, self.pool.a[key])
            if rows is not None:
                self.pool.place_a(key, rows)
                fused += 1
            t.layer.lora_hook = LoRAHook(self.runtime, self.pool.a[key], self.pool.b[key], t.layer.output_sizes,
                                         fused=rows is not None)
        if fused and torch.cuda.is_available() and torch.device(self.device).type == "cuda":
            torch.cuda.empty_cache()   # the replaced weights' blocks: KV sizing reads mem_get_info
        logger.info("LoRA: %d of %d layers fuse the shrink into their base GEMM", fused, len(targets))

    def _extra_rows(self, layer, a: torch.Tensor) -> Optional[torch.Tensor]:
        """The layer's extra weight rows that hold its slots' A (fused shrink), or None: the
        backend does not fuse, the method cannot carry rows (quantized), or the layer is
        row-parallel (its h would need the all-reduce the base output gets)."""
        if not self.runtime.ops.fuses or layer.in_shard is not None:
            return None
        return layer.method.extend_rows(layer, a.shape[0] * a.shape[1])

    # -- adapters ------------------------------------------------------------------------------
    def load(self, name: str, path: str) -> LoRAAdapter:
        if name in self.adapters:
            raise LoRAError(f"lora_name: an adapter named {name!r} is already loaded")
        adapter = load_adapter(name, path, self.by_peft, self.config.max_lora_rank, self.config.target_modules)
        self.adapters[name] = adapter
        self.uid[name] = next(self._uids)
        self.requests.setdefault(name, 0)
        logger.info("LoRA adapter %r loaded from %s (rank %d, %s)", name, path, adapter.rank,
                    ", ".join(adapter.target_modules))
        return adapter

    def unload(self, name: str) -> None:
        """Forgets the adapter; the caller made sure no admitted request still uses it."""
        if name not in self.adapters:
            raise LoRAError(f"lora_name: no adapter named {name!r} is loaded")
        slot = self.slot_of.pop(name, None)
        if slot is not None:
            if self.pins[slot]:
                self.slot_of[name] = slot
                raise LoRAError(f"lora_name: adapter {name!r} is used by {self.pins[slot]} running requests")
            self.owner[slot] = None
            self.pool.clear(slot)
        del self.adapters[name]
        del self.uid[name]
        logger.info("LoRA adapter %r unloaded", name)

    def describe(self) -> list[dict]:
        return [{"name": n, "path": a.path, "rank": a.rank, "target_modules": list(a.target_modules),
                 "in_slot": n in self.slot_of, "requests": self.requests.get(n, 0)}
                for n, a in self.adapters.items()]

    # -- slots (scheduler) ---------------------------------------------------------------------
    def acquire(self, name: Optional[str]) -> Optional[int]:
        """The slot for one admitted request of adapter ``name`` (pinned), BASE_SLOT for the base
        model, or None when no slot can take it now."""
        if name is None:
            return BASE_SLOT
        slot = self.slot_of.get(name)
        if slot is None:
            slot = self._free_slot()
            if slot is None:
                return None
            old = self.owner[slot]
            if old is not None:
                del self.slot_of[old]
            self.pool.write(slot, self.adapters[name])
            self.owner[slot], self.slot_of[name] = name, slot
        self.pins[slot] += 1
        self.last_used[slot] = next(self._clock)
        self.requests[name] = self.requests.get(name, 0) + 1
        return slot

    def release(self, slot: int) -> None:
        if slot != BASE_SLOT:
            assert self.pins[slot] > 0, f"LoRA slot {slot} released more often than acquired"
            self.pins[slot] -= 1

    def _free_slot(self) -> Optional[int]:
        empty = [s for s, o in enumerate(self.owner) if o is None]
        if empty:
            return empty[0]
        idle = [s for s in range(len(self.owner)) if self.pins[s] == 0]
        return min(idle, key=lambda s: self.last_used[s]) if idle else None

    def pinned(self, name: str) -> int:
        slot = self.slot_of.get(name)
        return 0 if slot is None else self.pins[slot]

    # -- forward (model runner) ----------------------------------------------------------------
    def batch_info(self, slots: list[int], seg_lens: list[int]) -> LoRABatchInfo:
        return build_batch_info(slots, seg_lens, self.device)

    def bind(self, info: Optional[LoRABatchInfo]) -> None:
        self.runtime.bind(info)
