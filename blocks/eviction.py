"""Which idle components to offload to free `need` bytes: the smallest sufficient set.

`plan_eviction` is the choice both weight pools make: the `ComponentsManager` of one process
(device memory under a budget) and a Ray replica's pooled weights (`deployments.weight_pool`).
It offloads as few bytes as will do, and among equal choices the least recently used.

Not handled here: what is idle or in use, and the moving itself (the callers').
"""

from __future__ import annotations

from typing import NamedTuple

# The eviction search is exact for the handful of models a process holds; this bounds it
# (keeping the best set found so far) should someone register hundreds of modules.
MAX_SEARCH_NODES = 200_000


class EvictionCandidate(NamedTuple):
    """An idle resident component that `plan_eviction` may offload; `tick` orders by last use."""

    id: str
    bytes: int
    tick: int


def plan_eviction(candidates: list[EvictionCandidate], need: int) -> list[str] | None:
    """Ids of the set with the smallest total bytes >= `need`; None if no set is enough.

    Among sets of equal total, the one whose most recently used member is least recent wins
    (then the next member, and so on). Exact by branch and bound over candidates sorted
    largest first; `MAX_SEARCH_NODES` caps the search, keeping the best set so far.
    """
    if need <= 0:
        return []
    usable = sorted((c for c in candidates if c.bytes > 0), key=lambda c: (-c.bytes, c.tick))
    if sum(c.bytes for c in usable) < need:
        return None
    suffix = [0] * (len(usable) + 1)  # suffix[i]: bytes of usable[i:]
    for i in range(len(usable) - 1, -1, -1):
        suffix[i] = suffix[i + 1] + usable[i].bytes

    def key(chosen: list[EvictionCandidate]) -> tuple[int, tuple[int, ...]]:
        return sum(c.bytes for c in chosen), tuple(sorted((c.tick for c in chosen), reverse=True))

    best = _greedy_lru(usable, need)  # always valid, so the search only has to improve on it
    best_key = key(best)
    nodes = 0
    chosen: list[EvictionCandidate] = []

    def search(i: int, total: int) -> None:
        nonlocal best, best_key, nodes
        nodes += 1
        if total >= need:
            candidate_key = key(chosen)
            if candidate_key < best_key:
                best, best_key = list(chosen), candidate_key
            return
        if i == len(usable) or total + suffix[i] < need or nodes > MAX_SEARCH_NODES:
            return
        if total + usable[i].bytes <= best_key[0]:  # only sets that can tie or beat the best
            chosen.append(usable[i])
            search(i + 1, total + usable[i].bytes)
            chosen.pop()
        search(i + 1, total)

    search(0, 0)
    return [c.id for c in best]


def _greedy_lru(usable: list[EvictionCandidate], need: int) -> list[EvictionCandidate]:
    chosen, total = [], 0
    for candidate in sorted(usable, key=lambda c: c.tick):
        chosen.append(candidate)
        total += candidate.bytes
        if total >= need:
            break
    return chosen
