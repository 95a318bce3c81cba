"""Orders the waiting queue. Retracted requests always go first (they already hold progress).
With priority scheduling (``priority_sign`` +1: higher ``priority`` values first, -1: lower
first) the policy's order is kept within each priority value."""
from __future__ import annotations

import random
from collections import defaultdict
from typing import Callable

from kvyard.scheduler.req import Req

LPM_MAX_QUEUE = 128  # beyond this, prefix matching every waiting request costs more than it saves


def order_waiting(policy: str, waiting: list[Req], match_len: Callable[[Req], tuple[int, object]],
                  rng: random.Random, priority_sign: int = 0) -> list[Req]:
    retracted = [r for r in waiting if r.retractions]
    fresh = [r for r in waiting if not r.retractions]
    if policy == "fcfs" or (policy in ("lpm", "dfs-weight") and len(fresh) > LPM_MAX_QUEUE):
        fresh.sort(key=lambda r: r.arrival)
    elif policy == "lpm":
        lens = {id(r): match_len(r)[0] for r in fresh}
        fresh.sort(key=lambda r: (-lens[id(r)], r.arrival))
    elif policy == "dfs-weight":
        fresh = _by_shared_node(fresh, match_len)
    elif policy == "random":
        rng.shuffle(fresh)
    elif policy == "priority":
        fresh.sort(key=lambda r: (-r.priority, r.arrival))
    else:
        raise ValueError(f"schedule_policy: unknown policy {policy!r}")
    if priority_sign:
        fresh.sort(key=lambda r: -priority_sign * r.priority)   # stable: the policy's order within a value
    return sorted(retracted, key=lambda r: r.arrival) + fresh


def _by_shared_node(reqs: list[Req], match_len) -> list[Req]:
    """Requests that end their cached prefix at the same tree node run together, the group with
    the most waiting requests first, so a shared prefix is computed once and stays hot."""
    groups: dict[int, list[Req]] = defaultdict(list)
    for r in reqs:
        _, node = match_len(r)
        groups[id(node)].append(r)
    ordered = sorted(groups.values(), key=lambda g: (-len(g), min(r.arrival for r in g)))
    return [r for g in ordered for r in sorted(g, key=lambda r: r.arrival)]
