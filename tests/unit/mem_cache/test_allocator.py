"""SlotAllocator (pages, dummy page, double free) and ReqToTokenPool (rows, dummy row)."""
import pytest
import torch

from kvyard.mem_cache.allocator import SlotAllocator
from kvyard.mem_cache.req_to_token import ReqToTokenPool


def _grow(alloc: SlotAllocator, slots: torch.Tensor, n: int) -> torch.Tensor:
    """Extend a sequence whose slots are `slots` by n tokens."""
    last = int(slots[-1]) if slots.numel() else -1
    new = alloc.alloc_for_req(slots.numel(), last, n)
    assert new is not None
    return torch.cat([slots, new])


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_dummy_page_is_never_handed_out(page_size):
    alloc = SlotAllocator(num_slots=8 * page_size, page_size=page_size)
    assert alloc.available() == 7 * page_size
    slots = alloc.alloc_for_req(0, -1, alloc.available())
    assert slots is not None and slots.numel() == 7 * page_size
    assert int(slots.min()) == page_size
    assert sorted(slots.tolist()) == list(range(page_size, 8 * page_size))
    assert alloc.available() == 0


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_positions_keep_their_page_offset_across_growth(page_size):
    alloc = SlotAllocator(num_slots=64 * page_size, page_size=page_size)
    slots = torch.empty(0, dtype=torch.int64)
    for n in [3, 1, 1, page_size + 2, 1, 2 * page_size, 5]:
        expected_pages = alloc.pages_needed(slots.numel(), n)
        before = alloc.available()
        slots = _grow(alloc, slots, n)
        assert before - alloc.available() == expected_pages * page_size
    positions = torch.arange(slots.numel())
    assert torch.equal(slots % page_size, positions % page_size)
    # positions of one page-block live in one page
    pages = (slots // page_size).view(-1)[: slots.numel() // page_size * page_size]
    assert (pages.view(-1, page_size) == pages.view(-1, page_size)[:, :1]).all()
    assert slots.unique().numel() == slots.numel()


def test_pages_needed_uses_tail_of_last_page():
    alloc = SlotAllocator(num_slots=64, page_size=4)
    assert alloc.pages_needed(0, 0) == 0
    assert alloc.pages_needed(0, 1) == 1
    assert alloc.pages_needed(0, 4) == 1
    assert alloc.pages_needed(0, 5) == 2
    assert alloc.pages_needed(5, 3) == 0   # positions 5, 6, 7 fit in the page of position 4
    assert alloc.pages_needed(5, 4) == 1
    assert alloc.pages_needed(8, 1) == 1


def test_alloc_fails_without_side_effects():
    alloc = SlotAllocator(num_slots=16, page_size=4)   # 3 usable pages
    held = alloc.alloc_for_req(0, -1, 9)                # 3 pages, 3 slots of tail left
    assert alloc.available() == 0
    assert alloc.alloc_for_req(9, int(held[-1]), 4) is None
    assert alloc.available() == 0
    tail = alloc.alloc_for_req(9, int(held[-1]), 3)     # fits in the tail: no page needed
    assert tail.tolist() == [int(held[-1]) + 1, int(held[-1]) + 2, int(held[-1]) + 3]


def test_alloc_rejects_last_loc_at_wrong_offset():
    alloc = SlotAllocator(num_slots=32, page_size=4)
    slots = alloc.alloc_for_req(0, -1, 2)
    with pytest.raises(ValueError, match="last_loc"):
        alloc.alloc_for_req(2, int(slots[0]), 1)


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_free_returns_whole_pages_and_reuses_them(page_size):
    alloc = SlotAllocator(num_slots=4 * page_size, page_size=page_size)
    a = alloc.alloc_for_req(0, -1, page_size)
    b = alloc.alloc_for_req(0, -1, 1)
    assert alloc.available() == page_size
    alloc.free(b)                                    # frees b's whole page
    assert alloc.available() == 2 * page_size
    alloc.free(a[:1])                                # any slot of a page frees the page
    assert alloc.available() == 3 * page_size
    again = alloc.alloc_for_req(0, -1, 3 * page_size)
    assert sorted(again.tolist()) == list(range(page_size, 4 * page_size))


@pytest.mark.parametrize("page_size", [1, 4])
def test_double_free_and_dummy_free_raise(page_size):
    alloc = SlotAllocator(num_slots=8 * page_size, page_size=page_size)
    slots = alloc.alloc_for_req(0, -1, 2)
    alloc.free(slots)
    with pytest.raises(AssertionError, match="double free"):
        alloc.free(slots)
    with pytest.raises(AssertionError, match="double free"):
        alloc.free(torch.tensor([3 * page_size]))       # never allocated
    with pytest.raises(AssertionError, match="out of range"):
        alloc.free(torch.tensor([0]))


def test_free_slots_and_clear():
    alloc = SlotAllocator(num_slots=32, page_size=4)
    held = alloc.alloc_for_req(0, -1, 6)               # two pages
    free = alloc.free_slots()
    assert free.numel() == alloc.available() == 20
    assert set(free.tolist()).isdisjoint(held.tolist())
    held_pages = set((held // 4).tolist())
    held_slots = {4 * p + o for p in held_pages for o in range(4)}
    assert len(held_pages) == 2
    assert set(free.tolist()) == set(range(4, 32)) - held_slots
    alloc.clear()
    assert alloc.free_slots().tolist() == list(range(4, 32))


def test_many_small_frees_then_large_alloc():
    alloc = SlotAllocator(num_slots=1001, page_size=1)
    singles = [alloc.alloc_for_req(i, -1, 1) for i in range(1000)]
    assert alloc.alloc_for_req(0, -1, 1) is None
    for s in singles[::2]:
        alloc.free(s)
    got = alloc.alloc_for_req(0, -1, 500)
    assert sorted(got.tolist()) == sorted(int(s) for s in singles[::2])


@pytest.mark.parametrize("num_slots, page_size", [(10, 4), (4, 4), (8, 0)])
def test_bad_allocator_config(num_slots, page_size):
    with pytest.raises(ValueError, match="num_slots|page_size"):
        SlotAllocator(num_slots=num_slots, page_size=page_size)


def test_req_to_token_rows():
    pool = ReqToTokenPool(max_reqs=3, max_context_len=8)
    assert pool.table.shape == (4, 8) and pool.table.dtype == torch.int32
    rows = [pool.alloc() for _ in range(3)]
    assert sorted(rows) == [1, 2, 3] and pool.alloc() is None and pool.available() == 0
    pool.write(rows[0], 2, torch.tensor([7, 8, 9]))
    assert pool.table[rows[0]].tolist() == [0, 0, 7, 8, 9, 0, 0, 0]
    assert not pool.table[0].any()
    pool.free(rows[1])
    assert pool.available() == 1 and pool.alloc() == rows[1]
    pool.free(rows[2])
    with pytest.raises(AssertionError, match="double free"):
        pool.free(rows[2])


def test_req_to_token_rejects_bad_writes():
    pool = ReqToTokenPool(max_reqs=2, max_context_len=4)
    with pytest.raises(ValueError, match="row"):
        pool.write(0, 0, torch.tensor([1]))
    with pytest.raises(ValueError, match="max_context_len"):
        pool.write(1, 3, torch.tensor([1, 2]))


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_alloc_decode_matches_one_alloc_per_sequence(page_size):
    """A batched decode allocation gives each sequence the slot alloc_for_req would: same page
    offset rule, same pages used, no slot handed out twice."""
    alloc = SlotAllocator(num_slots=64 * page_size, page_size=page_size)
    lengths = [1, page_size, page_size + 1, 2 * page_size - 1, 3]
    seqs = [alloc.alloc_for_req(0, -1, n) for n in lengths]
    before = alloc.available()
    new = alloc.alloc_decode([s.numel() for s in seqs], [int(s[-1]) for s in seqs])
    assert new is not None and new.shape == (len(seqs),)
    expected_pages = sum(alloc.pages_needed(s.numel(), 1) for s in seqs)
    assert before - alloc.available() == expected_pages * page_size
    for seq, slot in zip(seqs, new.tolist()):
        assert slot % page_size == seq.numel() % page_size
        if seq.numel() % page_size:
            assert slot == int(seq[-1]) + 1
    everything = torch.cat([*seqs, new])
    assert everything.unique().numel() == everything.numel()


def test_alloc_decode_fails_without_side_effects():
    alloc = SlotAllocator(num_slots=4, page_size=1)
    assert alloc.alloc_decode([5, 5, 5, 5], None) is None
    assert alloc.available() == 3
    assert alloc.alloc_decode([5, 5, 5], None) is not None and alloc.available() == 0


def test_req_to_token_write_and_read_tokens():
    pool = ReqToTokenPool(max_reqs=3, max_context_len=8)
    pool.write_tokens([1, 3], [0, 7], torch.tensor([11, 13]))
    assert pool.read_tokens([1, 3, 2], [0, 7, 0]) == [11, 13, 0]
    assert pool.table[0].abs().sum() == 0
    with pytest.raises(ValueError, match="rows"):
        pool.write_tokens([0], [0], torch.tensor([1]))
    with pytest.raises(ValueError, match="positions"):
        pool.write_tokens([1], [8], torch.tensor([1]))
