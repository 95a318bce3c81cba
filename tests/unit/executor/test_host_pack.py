"""kvyard.executor.host_pack: a step's index lists reach the device in one copy, as views of one
buffer (the packing is checked on the CPU; there ``to_device`` makes one tensor per part)."""
import pytest
import torch

from kvyard.executor.host_pack import ALIGN, packed, to_device


@pytest.mark.parametrize("pack", [packed, to_device], ids=["packed", "to_device"])
def test_each_part_exact_aligned_and_independent(pack):
    parts = ([3, 1, 4], [], [1, 5, 9, 2], [6])
    tail = torch.tensor([7, 8, 9], dtype=torch.int64)
    out = pack(parts, tail, "cpu")
    assert [t.tolist() for t in out] == [list(p) for p in parts] + [[7, 8, 9]]
    for t in out:
        assert t.dtype == torch.int64 and t.is_contiguous() and t.dim() == 1
        assert t.data_ptr() % (8 * ALIGN) == 0 or t.numel() == 0
    out[0][:] = -1                              # in place on one leaves the others as they were
    out[2].add_(100)
    assert out[1].tolist() == [] and out[3].tolist() == [6] and out[2].tolist() == [101, 105, 109, 102]


def test_packed_views_share_one_buffer_and_copy_the_tail():
    tail = torch.tensor([7, 8], dtype=torch.int64)
    out = packed(([2], [3, 4, 5]), tail, "cpu")
    assert len({t.untyped_storage().data_ptr() for t in out}) == 1
    out[2][0] = 0
    assert tail.tolist() == [7, 8]
    empty = packed(([], [2]), torch.empty(0, dtype=torch.int64), "cpu")
    assert [t.tolist() for t in empty] == [[], [2], []]
