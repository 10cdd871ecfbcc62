"""Ray mode's LoRA load and eviction metrics without Ray: replicas' `LoraCache`s count into a
`LoraEventCounts`, the registry's `LoraEventTotals` sums their heartbeats, and the router's
`/metrics` exports the sums under embedded mode's names, each series once."""

from __future__ import annotations

from blocks import ComponentsManager
from deployments.lora_cache import AdapterEntry, LoraCache
from deployments.lora_events import LoraEventCounts, LoraEventTotals
from service.metrics import ServiceMetrics
from service.ray_placement import ReplicaLoraCollector

ENTRIES = {name: AdapterEntry(f"/loras/{name}.safetensors") for name in ("a", "b")}


class _LoadsNothing:
    """A replica's loader as the cache sees it; what loading does is not what is counted."""

    def load(self, name: str, entry: AdapterEntry) -> None:
        return None

    def unload(self, name: str) -> None:
        return None


def _replica(model: str = "m") -> tuple[LoraCache, LoraEventCounts, list[int]]:
    reports: list[int] = []
    counts = LoraEventCounts(on_change=lambda: reports.append(1))
    return LoraCache(model, ENTRIES, _LoadsNothing(), capacity=1, observer=counts), counts, \
        reports


def test_the_router_exports_the_replicas_loads_and_evictions_summed_once() -> None:
    first, first_counts, first_reports = _replica()
    second, second_counts, _ = _replica()
    for names in (["a"], ["b"], ["b"]):  # a loads, b loads (a evicted), b is already loaded
        with first.using(names):
            pass
    with second.using(["a"]):
        pass
    assert first_counts.rows() == [("evict", "m", "a", 1), ("load", "m", "a", 1),
                                   ("load", "m", "b", 1)]  # requests are the router's
    assert len(first_reports) == 3  # each load and eviction is reported at once

    registry = LoraEventTotals()
    registry.report("first", first_counts.rows())
    registry.report("second", second_counts.rows())
    registry.report("vae", [])
    registry.report("first", first_counts.rows())  # a late heartbeat adds nothing
    assert registry.rows() == [("evict", "m", "a", 1), ("load", "m", "a", 2),
                               ("load", "m", "b", 1)]  # a load per replica

    metrics = ServiceMetrics(ComponentsManager())
    metrics.add_collector(ReplicaLoraCollector(registry.rows))
    metrics.lora_event("request", "m", "a")  # the router's cache counts requests only
    metrics.lora_event("load", "m", "a")  # (it never loads; were it to, nothing doubles)
    text = metrics.render().decode()
    for line in ('blockserve_lora_loads_total{lora="a",model="m"} 2.0',
                 'blockserve_lora_loads_total{lora="b",model="m"} 1.0',
                 'blockserve_lora_evictions_total{lora="a",model="m"} 1.0',
                 'blockserve_lora_requests_total{lora="a",model="m"} 1.0'):
        assert line in text
    for name in ("loads", "evictions", "requests"):
        assert text.count(f"# TYPE blockserve_lora_{name}_total counter") == 1, name
    assert text.count("blockserve_lora_loads_total{") == 2
    assert "per replica" in text  # the help says what a load counts in Ray mode

    # A replica gone and a new one loading: the totals only grow.
    third, third_counts, _ = _replica()
    with third.using(["b"]):
        pass
    registry.report("third", third_counts.rows())
    assert ('load', 'm', 'b', 2) in registry.rows()
    assert 'blockserve_lora_loads_total{lora="b",model="m"} 2.0' in metrics.render().decode()


def test_no_registry_no_replica_series() -> None:
    metrics = ServiceMetrics(ComponentsManager())
    metrics.add_collector(ReplicaLoraCollector(lambda: None))
    text = metrics.render().decode()
    assert "# TYPE blockserve_lora_loads_total counter" in text
    assert "blockserve_lora_loads_total{" not in text
