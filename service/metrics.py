"""Prometheus metrics of one app, in its own registry (two apps in a process never collide).

    blockserve_requests_total{model,workflow,status}      image requests (and jobs created), by
                                                          HTTP status (499: the client left)
    blockserve_http_requests_total{route,method,status}   every HTTP request, by route template
                                                          ("unmatched" when no route matched)
    blockserve_request_duration_seconds{model,workflow}   image request latency
    blockserve_block_duration_seconds{model,block}        each top-level block of a pipeline run
    blockserve_images_generated_total{model}
    blockserve_component_loads_total{source}              storage: loaded from a checkpoint;
                                                          device: moved onto the device by the
                                                          ComponentsManager's auto offload
    blockserve_component_offloads_total                   moves off the device
    blockserve_component_resident_bytes{device}           bytes of held weights, by device
    blockserve_queue_depth                                jobs waiting for the engine
    blockserve_inflight_jobs                              jobs in the batch running now
    blockserve_queue_wait_seconds{model}                  time from submission to running
    blockserve_batch_size{model}                          images denoised together per step
    blockserve_step_batch_size{model}                     requests per model forward of a
                                                          denoising step
    blockserve_denoise_steps_total{model}                 denoising steps done (per request)
    blockserve_step_seconds{model}                        duration of one denoising step of
                                                          the requests stepped together
    blockserve_step_cache_forwards_total{model,method,kind}  step caching's decisions, one
                                                          per request, model pass and step:
                                                          kind full (the whole model ran) or
                                                          cached (its deep part was skipped);
                                                          none for requests without caching
    blockserve_cancellations_total{model,stage}           jobs cancelled (client, DELETE or
                                                          disconnect) while queued or running
    blockserve_timeouts_total{model,stage}                jobs stopped at their deadline
    blockserve_models_ready                               models loaded and ready
    blockserve_result_cache_lookups_total{model,result}   exact-repeat cache lookups: hit or
                                                          miss (none while the cache is off)
    blockserve_result_cache_bytes                         pixels the result cache holds
    blockserve_lora_requests_total{model,lora}            requests (jobs) using each adapter
    blockserve_lora_loads_total{model,lora}               adapters loaded (first use, or again
                                                          after an eviction); in Ray mode per
                                                          replica (two replicas loading one
                                                          adapter: two loads)
    blockserve_lora_evictions_total{model,lora}           adapters unloaded to make room

Labels only ever carry configured model, workflow and adapter names, never request text, so
their number stays bounded. The component series are read from the ComponentsManager when
scraped, not pushed. The step series are recorded from the steps each job hears about, in Ray
mode too (the Denoiser replica streams them to the router): the forward sizes and durations of
a step come with one job's report, so each forward is counted once; a job's step-cache
decisions come with its own reports (`StepReport.cache_*`). A placement may add
collectors (`add_collector`); one that exports a series of the app's own takes it over: in Ray
mode the LoRA loads and evictions happen in the replicas and are read from the weight pool's
registry when scraped (`service.ray_placement.ReplicaLoraCollector`), under the same names.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_WAIT_BUCKETS = (0.001, 0.0025, *_LATENCY_BUCKETS)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
# A method label outside these is "other": clients choose methods, labels must stay bounded.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# `deployments.lora_cache`'s events: {event: (series name without _total, help)}; the Ray
# placement's collector exports its load and eviction series under these names too.
LORA_SERIES = {
    "request": ("blockserve_lora_requests", "Jobs using each LoRA adapter."),
    "load": ("blockserve_lora_loads", "LoRA adapters loaded (on first use or after an "
             "eviction); in Ray mode counted per replica: two replicas loading one adapter "
             "are two loads."),
    "evict": ("blockserve_lora_evictions", "LoRA adapters unloaded to make room for another "
              "(in Ray mode, per replica)."),
}


class _ComponentsCollector(Collector):
    """Component series from the ComponentsManager, computed at scrape time."""

    def __init__(self, manager: Any) -> None:
        self._manager = manager
        self._lock = threading.Lock()
        self._last_record: Any = None  # the newest offload-log record already counted
        self._device_loads = 0
        self._offloads = 0
        self.storage_loads = 0

    def _count_new_moves(self) -> None:
        log = self._manager.offload_log
        new = []
        for record in reversed(log):  # the log is bounded: count only what we haven't seen
            if record is self._last_record:
                break
            new.append(record)
        if log:
            self._last_record = log[-1]
        for record in new:
            if record.is_load:
                self._device_loads += 1
            else:
                self._offloads += 1

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            self._count_new_moves()
            loads = CounterMetricFamily(
                "blockserve_component_loads", "Components loaded, by source.", labels=["source"]
            )
            loads.add_metric(["storage"], self.storage_loads)
            loads.add_metric(["device"], self._device_loads)
            offloads = CounterMetricFamily(
                "blockserve_component_offloads", "Components moved off the device."
            )
            offloads.add_metric([], self._offloads)
        resident = GaugeMetricFamily(
            "blockserve_component_resident_bytes", "Bytes of held weights, by device.",
            labels=["device"],
        )
        for device, count in sorted(self._manager.bytes_by_device().items()):
            resident.add_metric([device], count)
        yield loads
        yield offloads
        yield resident


class ServiceMetrics:
    """All metrics of one app, and the hooks the registry and routes report through."""

    def __init__(self, manager: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "blockserve_requests_total", "Image requests, by model, workflow and HTTP status.",
            ["model", "workflow", "status"], registry=self.registry,
        )
        self.http_requests = Counter(
            "blockserve_http_requests_total",
            "Every HTTP request, by route template, method and HTTP status.",
            ["route", "method", "status"], registry=self.registry,
        )
        self.request_duration = Histogram(
            "blockserve_request_duration_seconds", "Image request latency.",
            ["model", "workflow"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.block_duration = Histogram(
            "blockserve_block_duration_seconds", "Time in each top-level pipeline block.",
            ["model", "block"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.images_generated = Counter(
            "blockserve_images_generated_total", "Images generated.", ["model"],
            registry=self.registry,
        )
        self.queue_depth = Gauge("blockserve_queue_depth", "Jobs waiting for the engine.",
                                 registry=self.registry)
        self.inflight_jobs = Gauge("blockserve_inflight_jobs",
                                   "Jobs in the batch the engine is running.",
                                   registry=self.registry)
        self.queue_wait = Histogram(
            "blockserve_queue_wait_seconds", "Time from submission until a job starts running.",
            ["model"], buckets=_WAIT_BUCKETS, registry=self.registry,
        )
        self.batch_size = Histogram(
            "blockserve_batch_size", "Images denoised together in one step.", ["model"],
            buckets=_BATCH_BUCKETS, registry=self.registry,
        )
        self.step_batch_size = Histogram(
            "blockserve_step_batch_size", "Requests per model forward of a denoising step.",
            ["model"], buckets=_BATCH_BUCKETS, registry=self.registry,
        )
        self.denoise_steps = Counter(
            "blockserve_denoise_steps_total", "Denoising steps done, counted per request.",
            ["model"], registry=self.registry,
        )
        self.step_seconds = Histogram(
            "blockserve_step_seconds",
            "Duration of one denoising step of the requests stepped together.", ["model"],
            buckets=_STEP_BUCKETS, registry=self.registry,
        )
        self.step_cache_forwards = Counter(
            "blockserve_step_cache_forwards_total",
            "Step caching's decisions, one per request, model pass and denoising step: kind "
            "full (the whole model ran) or cached (the method skipped its deep part). Requests "
            "without step caching are not counted.",
            ["model", "method", "kind"], registry=self.registry,
        )
        self.cancellations = Counter(
            "blockserve_cancellations_total",
            "Jobs cancelled (by the client, DELETE or a disconnect), by where they were.",
            ["model", "stage"], registry=self.registry,
        )
        self.timeouts = Counter(
            "blockserve_timeouts_total", "Jobs stopped at their deadline, by where they were.",
            ["model", "stage"], registry=self.registry,
        )
        self.models_ready = Gauge("blockserve_models_ready", "Models loaded and ready.",
                                  registry=self.registry)
        self.result_cache_lookups = Counter(
            "blockserve_result_cache_lookups_total",
            "Exact-repeat result cache lookups, by model and result (hit or miss).",
            ["model", "result"], registry=self.registry,
        )
        self.result_cache_bytes = Gauge("blockserve_result_cache_bytes",
                                        "Bytes of pixels held by the result cache.",
                                        registry=self.registry)
        self.lora_events = {
            event: Counter(name, help_text, ["model", "lora"], registry=self.registry)
            for event, (name, help_text) in LORA_SERIES.items()
        }
        self._components = _ComponentsCollector(manager)
        self.registry.register(self._components)

    def add_collector(self, collector: Collector) -> None:
        """Export `collector`'s series too. The LoRA series it describes (`describe()`) are
        its own from now on: the app's counters of those names are dropped, so that no series
        is exported twice."""
        described = {metric.name for metric in getattr(collector, "describe", list)()}
        for event, (name, _) in LORA_SERIES.items():
            if name in described and event in self.lora_events:
                self.registry.unregister(self.lora_events.pop(event))
        self.registry.register(collector)

    # Hooks ----------------------------------------------------------------------------------

    def components_loaded(self, _model: str, count: int) -> None:
        with self._components._lock:
            self._components.storage_loads += count

    def lora_event(self, event: str, model: str, lora: str) -> None:
        """`deployments.lora_cache`'s observer: event is request, load or evict (not
        counted here when a placement's collector exports it: `add_collector`)."""
        counter = self.lora_events.get(event)
        if counter is not None:
            counter.labels(model, lora).inc()

    def observe_request(self, model: str, workflow: str, status: int, seconds: float) -> None:
        self.requests.labels(model, workflow, str(status)).inc()
        self.request_duration.labels(model, workflow).observe(seconds)

    def observe_http(self, route: str | None, method: str, status: int) -> None:
        """`route`: the matched route's template (None: no route matched)."""
        self.http_requests.labels(route or "unmatched",
                                  method if method in _METHODS else "other", str(status)).inc()

    def watch(self, queued: Callable[[], int], running: Callable[[], int],
              ready: Callable[[], int], result_cache_bytes: Callable[[], int]) -> None:
        self.queue_depth.set_function(queued)
        self.inflight_jobs.set_function(running)
        self.models_ready.set_function(ready)
        self.result_cache_bytes.set_function(result_cache_bytes)

    def result_cache_lookup(self, model: str, hit: bool) -> None:
        self.result_cache_lookups.labels(model, "hit" if hit else "miss").inc()

    # The engine's observer (service.engine.EngineObserver) ------------------------------

    def job_started(self, model: str, queue_seconds: float) -> None:
        self.queue_wait.labels(model).observe(queue_seconds)

    def denoise_step(self, model: str, report: Any) -> None:
        self.denoise_steps.labels(model).inc()
        for requests in report.forwards:
            self.step_batch_size.labels(model).observe(requests)
        if report.images:
            self.batch_size.labels(model).observe(report.images)
        if report.seconds is not None:
            self.step_seconds.labels(model).observe(report.seconds)
        if report.cache_method is not None:  # the job's own decisions, on each of its reports
            for kind, count in (("full", report.cache_full), ("cached", report.cache_cached)):
                self.step_cache_forwards.labels(model, report.cache_method, kind).inc(count)

    def block_finished(self, model: str, block: str, seconds: float) -> None:
        self.block_duration.labels(model, block).observe(seconds)

    def job_stopped(self, model: str, reason: str, stage: str) -> None:
        counter = self.timeouts if reason == "timeout" else self.cancellations
        counter.labels(model, stage).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
