"""kvyard.executor.host_pack: a step's index lists reach the device as views of one buffer."""
import torch

from kvyard.executor.host_pack import ALIGN, to_device


def test_views_equal_each_part_aligned_and_independent():
    parts = ([3, 1, 4], [], [1, 5, 9, 2], [6])
    tail = torch.tensor([7, 8, 9], dtype=torch.int64)
    out = to_device(parts, tail, "cpu")
    assert [t.tolist() for t in out] == [list(p) for p in parts] + [[7, 8, 9]]
    for t in out:
        assert t.dtype == torch.int64 and t.is_contiguous() and t.dim() == 1
        assert t.data_ptr() % (8 * ALIGN) == 0 or t.numel() == 0
    out[0][:] = -1                              # in place on one view leaves the others as they were
    out[2].add_(100)
    assert out[3].tolist() == [6] and out[4].tolist() == [7, 8, 9] and out[2].tolist() == [101, 105, 109, 102]
    assert tail.tolist() == [7, 8, 9]           # the host tensor is copied, not aliased


def test_empty_tail_and_parts():
    out = to_device(([], [2]), torch.empty(0, dtype=torch.int64), "cpu")
    assert [t.tolist() for t in out] == [[], [2], []]
