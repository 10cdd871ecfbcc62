"""LoRA adapter loads and evictions in Ray mode: counted in the replicas that load adapters,
summed in the weight pool's registry, read by the router's `/metrics` at scrape time.

    LoraEventCounts   a replica's counts per (event, model, lora) since it started: the
                      observer of its `LoraCache`s (`deployments.block_host`); its weight-pool
                      client sends them with every heartbeat (`PooledWeights.report`)
    LoraEventTotals   the registry's side: each replica's latest counts, summed

Counts are cumulative per replica and the registry keeps a replica's last counts after it goes
(a few numbers per replica that ever ran), so the totals never go down while the registry
lives, and a heartbeat that arrives after a replica said goodbye counts nothing twice. A load
counts per replica: two Denoiser replicas loading an adapter are two loads.

Not handled here: requests per adapter (the router's own cache counts them), the metric
series themselves (`service.ray_placement.ReplicaLoraCollector`).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterable

EVENTS = ("load", "evict")  # what a replica counts; requests are counted by the router
LoraEventRow = tuple[str, str, str, int]  # (event, model, lora, count): plain data for Ray


class LoraEventCounts:
    """A replica's adapter loads and evictions (module docstring). `on_change()` is called
    after each one (the replica reports at once instead of at its next heartbeat)."""

    def __init__(self, on_change: Callable[[], None] | None = None) -> None:
        self.on_change = on_change
        self._counts: Counter[tuple[str, str, str]] = Counter()
        self._lock = threading.Lock()

    def __call__(self, event: str, model: str, lora: str) -> None:
        """A `LoraCache` observer: counts `load` and `evict`, ignores `request`."""
        if event not in EVENTS:
            return
        with self._lock:
            self._counts[(event, model, lora)] += 1
        if self.on_change is not None:
            self.on_change()

    def rows(self) -> list[LoraEventRow]:
        with self._lock:
            return [(*key, count) for key, count in sorted(self._counts.items())]


class LoraEventTotals:
    """Every replica's latest counts, and their sums (module docstring)."""

    def __init__(self) -> None:
        self._by_replica: dict[str, list[LoraEventRow]] = {}

    def report(self, replica: str, rows: Iterable[LoraEventRow]) -> None:
        """`replica`'s cumulative counts now (they replace its previous report)."""
        self._by_replica[replica] = list(rows)

    def rows(self) -> list[LoraEventRow]:
        """(event, model, lora, count) summed over every replica that reported."""
        totals: Counter[tuple[str, str, str]] = Counter()
        for rows in self._by_replica.values():
            for event, model, lora, count in rows:
                totals[(event, model, lora)] += count
        return [(*key, count) for key, count in sorted(totals.items())]
