"""FutureTokenMap: placeholders for tokens a batch in flight will sample (overlap scheduling)."""
from __future__ import annotations

import random

import pytest
import torch

from kvyard.scheduler.future_tokens import FutureTokenMap


def test_placeholders_resolve_to_the_stored_tokens_and_real_ids_stay():
    fmap = FutureTokenMap(max_batch=4)
    start = fmap.allocate(3)
    holders = [FutureTokenMap.placeholder(start, k) for k in range(3)]
    assert all(h < 0 for h in holders) and len(set(holders)) == 3
    fmap.store(start, torch.tensor([11, 0, 250]))
    ids = torch.tensor([holders[2], 7, holders[0], 0, holders[1]])
    assert fmap.resolve_(ids) is ids                       # in place
    assert ids.tolist() == [250, 7, 11, 0, 0]              # token 0 is a real id, not a placeholder


def test_consecutive_ranges_never_overlap_and_index_zero_is_never_used():
    fmap = FutureTokenMap(max_batch=8)
    rng = random.Random(0)
    previous = None
    for _ in range(2000):
        n = rng.randrange(0, 9)
        start = fmap.allocate(n)
        if n == 0:
            assert start == 0
            continue
        current = set(range(start, start + n))
        assert min(current) >= 1 and max(current) <= fmap.capacity
        if previous is not None:
            assert not current & previous, "a live range was handed out again"
        previous = current


def test_a_batch_reads_the_tokens_of_the_batch_before_it():
    """The worker's order: resolve N's inputs, sample, store N's outputs; N+1 resolves them."""
    fmap = FutureTokenMap(max_batch=3)
    tokens = torch.tensor([5, 6, 7])
    expected = tokens.tolist()
    for step in range(50):                                 # wraps around the buffer many times
        start = fmap.allocate(3)
        fmap.store(start, tokens)
        next_inputs = torch.tensor([FutureTokenMap.placeholder(start, k) for k in (2, 0, 1)])
        assert fmap.resolve_(next_inputs).tolist() == [expected[2], expected[0], expected[1]]
        tokens = (tokens * 3 + step) % 256
        expected = tokens.tolist()


def test_allocation_limits():
    fmap = FutureTokenMap(max_batch=2)
    with pytest.raises(ValueError, match="1..2"):
        fmap.allocate(3)
    with pytest.raises(ValueError, match="max_batch"):
        FutureTokenMap(max_batch=0)
