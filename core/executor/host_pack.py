"""One host-to-device copy for a step's small int64 index tensors.

``ModelRunner.prepare`` turns several host lists (input ids, positions, request rows, sequence
lengths, extend starts, logits rows) and the host tensor of KV slots into device tensors. Copied
one by one, each is a tensor construction plus, on a GPU, a synchronous copy from pageable
memory. ``to_device`` packs them into one host buffer (pinned on CUDA), copies it in one
asynchronous transfer and hands back views of the device buffer. On the CPU there is no
transfer to save, and one tensor per part is cheaper than packing and slicing: each part
becomes its own tensor, the tail is used as it is.

Invariants: every result is int64, 1-D and contiguous, and equals ``torch.tensor(part)`` element
for element; results never overlap, so an in-place op on one leaves the others unchanged; each
starts at a multiple of ALIGN elements (16 bytes), the alignment a freshly allocated tensor has
and kernels may specialize on. A fresh buffer per call: overlap scheduling prepares step N + 1
while step N still reads its tensors, and the caching host allocator keeps a pinned block until
the copy out of it has finished.
"""
from __future__ import annotations

from typing import Sequence

import torch

ALIGN = 2      # int64 elements per 16 bytes


def _padded(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def to_device(parts: Sequence[Sequence[int]], tail: torch.Tensor, device) -> list[torch.Tensor]:
    """[len(parts) + 1] int64 device tensors: each host list of ``parts``, then ``tail`` (an int64
    host tensor, e.g. a step's KV slots), from one host buffer and one copy."""
    if device == "cpu" or getattr(device, "type", None) == "cpu":
        return [torch.tensor(part, dtype=torch.int64) for part in parts] + [tail.to(torch.int64)]
    return packed(parts, tail, device)


def upload(host: torch.Tensor, device) -> torch.Tensor:
    """``host`` on ``device``. To CUDA through pinned memory without waiting: a blocking copy
    from pageable memory would wait for every queued GPU step; elsewhere one plain copy."""
    if torch.device(device).type == "cuda" and not host.is_cuda:
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def packed(parts: Sequence[Sequence[int]], tail: torch.Tensor, device) -> list[torch.Tensor]:
    """``to_device``'s result as views of one buffer copied to ``device`` at once."""
    values: list[int] = []
    for part in parts:
        values += part
        values += [0] * (_padded(len(part)) - len(part))
    host = torch.tensor(values, dtype=torch.int64)
    if tail.numel():
        host = torch.cat((host, tail.to(torch.int64).flatten()))
    buf = upload(host, device)
    out, start = [], 0
    for part in parts:
        out.append(buf[start:start + len(part)])
        start += _padded(len(part))
    out.append(buf[start:start + tail.numel()])
    return out
