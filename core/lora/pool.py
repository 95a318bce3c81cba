"""LoRASlotPool: the device buffers of ``max_loras_per_batch`` adapter slots.

Per LoRA target (a Linear with n shards, ``in`` input and ``out`` = sum of shard outputs):
    A [S, n * R, in]    shard k's lora_A in rows [k R, k R + r)
    B [S, out, R]       shard k's lora_B (scaling folded in) in rows of its output columns, cols [0, r)
S = slots, R = --max-lora-rank. Everything outside an adapter's own rows and columns is zero, so a
smaller rank or an untouched module adds exactly nothing. Allocated once; slots are overwritten
in place (the CUDA graphs captured their addresses). A target whose base weight carries extra
rows (the fused shrink, kvyard.lora.hook) has its A moved once, at attach, into the trailing
rows of that weight (``place_a``); writes keep going to ``a[key]``, wherever it lives.
"""
from __future__ import annotations

import torch

from kvyard.lora.adapter import LoRAAdapter
from kvyard.lora.targets import LoRATarget


class LoRASlotPool:
    def __init__(self, targets: dict[str, LoRATarget], num_slots: int, max_rank: int,
                 dtype: torch.dtype, device):
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.targets = targets
        self.a: dict[str, torch.Tensor] = {}
        self.b: dict[str, torch.Tensor] = {}
        for key, t in targets.items():
            n, lin = len(t.shard_modules), t.layer
            self.a[key] = torch.zeros(num_slots, n * max_rank, lin.in_features, dtype=dtype, device=device)
            self.b[key] = torch.zeros(num_slots, lin.out_features, max_rank, dtype=dtype, device=device)

    def place_a(self, key: str, rows: torch.Tensor) -> torch.Tensor:
        """Target ``key``'s A lives in ``rows`` [S n R, in] from now on (its contents copied)."""
        a = self.a[key]
        if rows.data_ptr() != a.data_ptr():
            rows.copy_(a.reshape(rows.shape))
            self.a[key] = rows.view(a.shape)
        return self.a[key]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.a, self.b) for t in d.values())

    def write(self, slot: int, adapter: LoRAAdapter) -> None:
        """Slot ``slot`` holds ``adapter`` from now on (every target rewritten)."""
        r_max = self.max_rank
        for key, t in self.targets.items():
            a, b = self.a[key][slot], self.b[key][slot]
            a.zero_()
            b.zero_()
            for k in range(len(t.shard_modules)):
                weights = adapter.modules.get(t.peft_name(k))
                if weights is None:
                    continue
                la, lb = weights
                r = la.shape[0]
                start = sum(t.layer.output_sizes[:k])
                a[k * r_max:k * r_max + r].copy_(la)
                b[start:start + lb.shape[0], :r].copy_(lb)

    def clear(self, slot: int) -> None:
        for key in self.targets:
            self.a[key][slot].zero_()
            self.b[key][slot].zero_()
