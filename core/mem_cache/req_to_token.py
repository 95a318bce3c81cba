"""ReqToTokenPool: the table mapping (request row, token position) -> KV slot.

table: int32 [max_reqs + 1, max_context_len] on the device. Row 0 is the dummy row: it stays all
zeros (every entry points at dummy slot 0), so padded batch rows need no branch in kernels.
Rows 1 .. max_reqs are handed out one per running request.
"""
from __future__ import annotations

import torch

from kvyard.executor.host_pack import upload


class ReqToTokenPool:
    def __init__(self, max_reqs: int, max_context_len: int, device="cpu"):
        if max_reqs < 1:
            raise ValueError(f"max_reqs must be >= 1, got {max_reqs}")
        if max_context_len < 1:
            raise ValueError(f"max_context_len must be >= 1, got {max_context_len}")
        self.max_reqs = max_reqs
        self.max_context_len = max_context_len
        self.device = torch.device(device)
        self.table = torch.zeros((max_reqs + 1, max_context_len), dtype=torch.int32, device=self.device)
        self._free_rows = list(range(max_reqs, 0, -1))   # a stack: pops give 1, 2, 3, ...
        self._is_free = [False] + [True] * max_reqs

    def available(self) -> int:
        return len(self._free_rows)

    def alloc(self) -> int | None:
        """A free row index >= 1, or None when every row is taken."""
        if not self._free_rows:
            return None
        row = self._free_rows.pop()
        self._is_free[row] = False
        return row

    def free(self, row: int) -> None:
        assert 1 <= row <= self.max_reqs, f"free: row {row} out of range 1..{self.max_reqs}"
        assert not self._is_free[row], f"double free of req_to_token row {row}"
        self._is_free[row] = True
        self._free_rows.append(row)

    def write(self, row: int, start: int, slots: torch.Tensor) -> None:
        """table[row, start:start+len(slots)] = slots."""
        end = start + slots.numel()
        if not 1 <= row <= self.max_reqs:
            raise ValueError(f"row must be in 1..{self.max_reqs} (row 0 is the dummy row), got {row}")
        if start < 0 or end > self.max_context_len:
            raise ValueError(f"start..end = {start}..{end} outside 0..max_context_len "
                             f"({self.max_context_len})")
        # uploads never wait for queued GPU steps: a speculative verify allocates while the
        # draft steps still run
        self.table[row, start:end] = upload(slots.to(torch.int32), self.table.device)

    def write_tokens(self, rows: list[int], positions: list[int], slots: torch.Tensor) -> None:
        """table[rows[i], positions[i]] = slots[i] for every i, in one indexed write (a decode
        step's new slots)."""
        if not rows:
            return
        if min(rows) < 1 or max(rows) > self.max_reqs:
            raise ValueError(f"rows must be in 1..{self.max_reqs} (row 0 is the dummy row), got {rows}")
        if min(positions) < 0 or max(positions) >= self.max_context_len:
            raise ValueError(f"positions must be in 0..{self.max_context_len - 1}, got {positions}")
        index = upload(torch.tensor([rows, positions], dtype=torch.int64), self.table.device)
        self.table[index[0], index[1]] = upload(slots.to(torch.int32), self.table.device)

    def read_tokens(self, rows: list[int], positions: list[int]) -> list[int]:
        """[table[rows[i], positions[i]] for every i] on the host, in one gather."""
        index = torch.tensor([rows, positions], dtype=torch.int64).to(self.device, non_blocking=True)
        return self.table[index[0], index[1]].tolist()

    def clear(self) -> None:
        self.table.zero_()
        self._free_rows = list(range(self.max_reqs, 0, -1))
        self._is_free = [False] + [True] * self.max_reqs
