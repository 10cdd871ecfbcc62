"""Distributed mode: the same FastAPI app, as the Ray Serve ingress, with heavy blocks remote.

    serve run deployments/serve_config.yaml          # or: blockserve serve --ray

`build_app(args)` is the Serve application builder the YAML names. It reads the models file,
writes tiny checkpoints where asked, and binds one `TextEncoder`, `Denoiser` and `VAE`
deployment (`deployments.heavy`) plus the `Router`: the ingress whose ASGI app is
`create_app(settings, models, placement=RayPlacement(handles))`. `RayPlacement` swaps each
model's heavy top-level blocks for `RemoteBlock`s (the light ones run in the router) and
brings `RayEngine`.

`RayEngine` implements `Engine` for this placement: a bounded FIFO queue and a few worker
threads, each running one job's pipeline call at a time, so up to `concurrency` calls are in
flight to the deployments at once and the Denoiser's `@serve.batch` can merge them. Progress
is coarse (queued → started → completed: the denoise loop runs remotely in one call);
cancelling a running job cancels its pending remote call.

Not handled here: per-step progress and previews in Ray mode, and the demo family's blocks
(they have no heavy blocks and run in the router).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from blocks import ModularPipelineBlocks
from deployments.remote_block import (
    HEAVY_ROLES,
    RemoteBlock,
    remote_cancel_check,
    remote_pipeline_blocks,
)
from service.batch import run_batch
from service.engine import EngineStopped, QueueFull, _resolve
from service.jobs import CANCELLED, GenerationJob, GenerationResult
from service.models_file import ModelsFile, ModelsFileError, load_models_file
from service.registry import ModelRegistry, ensure_checkpoint
from service.settings import Settings

logger = logging.getLogger(__name__)

RAY_FAMILIES_SKIPPED = frozenset({"demo"})  # weight-free: run in the router


class RayEngine:
    """Jobs in FIFO order on `concurrency` threads; each thread runs one job at a time."""

    def __init__(self, registry: ModelRegistry, queue_size: int = 64, concurrency: int = 16,
                 observer: Any = None) -> None:
        self._registry = registry
        self.queue_size = queue_size
        self.concurrency = concurrency
        self._observer = observer
        self._cond = threading.Condition()
        self._pending: collections.deque[tuple[GenerationJob, Future, float]] = (
            collections.deque())
        self._running: set[str] = set()
        self._threads: list[threading.Thread] = []
        self._stopping = False

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._pending)

    @property
    def running(self) -> int:
        with self._cond:
            return len(self._running)

    def start(self) -> None:
        with self._cond:
            self._stopping = False
            self._threads = [t for t in self._threads if t.is_alive()]
            while len(self._threads) < self.concurrency:
                thread = threading.Thread(target=self._work, daemon=True,
                                          name=f"blockserve-ray-engine-{len(self._threads)}")
                thread.start()
                self._threads.append(thread)

    def stop(self, timeout: float | None = 30.0) -> None:
        with self._cond:
            self._stopping = True
            dropped = list(self._pending)
            self._pending.clear()
            threads, self._threads = self._threads, []
            self._cond.notify_all()
        for _job, future, _ in dropped:
            _resolve(future, error=EngineStopped("the server is shutting down"))
        for thread in threads:
            thread.join(timeout)

    def submit(self, job: GenerationJob) -> Future[GenerationResult]:
        future: Future[GenerationResult] = Future()
        with self._cond:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            if len(self._pending) >= self.queue_size:
                raise QueueFull(f"{len(self._pending)} jobs are already waiting", 2)
            self._pending.append((job, future, time.monotonic()))
            if job.listener is not None:
                job.listener.queued(len(self._pending) - 1)
            self._cond.notify()
        return future

    def cancel(self, job: GenerationJob, reason: str = CANCELLED) -> bool:
        stopped = job.cancel(reason)
        with self._cond:
            entry = next((e for e in self._pending if e[0] is job), None)
            if entry is not None:
                self._pending.remove(entry)
        if entry is not None:
            _resolve(entry[1], error=job.stop_error())
        return stopped

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job, future, enqueued = self._pending.popleft()
                self._running.add(job.id)
            try:
                self._run(job, future, enqueued)
            except Exception as error:  # never kill a worker
                logger.exception("ray engine: job %s failed unexpectedly", job.id)
                _resolve(future, error=error)
            finally:
                with self._cond:
                    self._running.discard(job.id)

    def _run(self, job: GenerationJob, future: Future, enqueued: float) -> None:
        if job.check_deadline() or not future.set_running_or_notify_cancel():
            _resolve(future, error=job.stop_error())
            return
        model = self._registry.get(job.model)
        if self._observer is not None:
            self._observer.job_started(job.model, time.monotonic() - enqueued)
            self._observer.batch_started(job.model, job.n)
        if job.listener is not None:
            job.listener.started()
        token = remote_cancel_check.set(lambda: job.check_deadline())
        try:
            outcome = run_batch(model, [job])[0]
        except Exception as error:
            _resolve(future, error=job.stop_error() if job.cancelled.is_set() else error)
            return
        finally:
            remote_cancel_check.reset(token)
        if isinstance(outcome, Exception):
            _resolve(future, error=outcome)
        else:
            _resolve(future, result=outcome)


class RayPlacement:
    """Heavy blocks on the deployments behind `handles` ({role: DeploymentHandle})."""

    def __init__(self, handles: dict[str, Any], concurrency: int = 16) -> None:
        self.handles = handles
        self.concurrency = concurrency
        self._remote: dict[str, list[str]] = {}  # model -> its blocks that run remotely

    def transform_blocks(self, config: Any, blocks: ModularPipelineBlocks
                         ) -> ModularPipelineBlocks:
        if config.family in RAY_FAMILIES_SKIPPED:
            return blocks
        remote = remote_pipeline_blocks(blocks, config.name, self.handles)
        self._remote[config.name] = [name for name, block in remote.sub_blocks.items()
                                     if isinstance(block, RemoteBlock)]
        return remote

    def make_engine(self, registry: ModelRegistry, settings: Settings, metrics: Any
                    ) -> RayEngine:
        return RayEngine(registry, queue_size=settings.queue_size,
                         concurrency=self.concurrency, observer=metrics)

    def describe(self, model: str) -> dict[str, Any] | None:
        """{block: {deployment, replicas}} for the heavy blocks of `model`, and under
        "weights" its components in the shared pool (`model_weights`)."""
        if not self._remote.get(model):
            return None
        replicas = deployment_replicas()
        described: dict[str, Any] = {
            block: {"deployment": HEAVY_ROLES[block], "replicas": replicas.get(HEAVY_ROLES[block])}
            for block in self._remote[model]}
        described["weights"] = model_weights(model, registry_stats())
        return described

    def metric_collectors(self) -> list[Any]:
        """Extra Prometheus collectors of this placement: the weight pool's series."""
        return [WeightPoolCollector()]


def model_weights(model: str, stats: dict[str, Any] | None) -> dict[str, Any] | None:
    """`model`'s pool entries ({component: entry, bytes, shared_with, nodes, resident per
    replica}) and the pool's counters; None when the pool is off or unreachable."""
    if stats is None:
        return None
    components = {}
    for entry in stats["entries"]:
        mine = [user.split("/", 1)[1] for user in entry["users"] if user.split("/", 1)[0] == model]
        for component in mine:
            components[component] = {
                "entry": entry["entry"], "bytes": entry["bytes"], "nodes": entry["nodes"],
                "shared_with": [u for u in entry["users"] if u != f"{model}/{component}"],
                "resident": entry["resident"],
            }
    return {"components": components, "pool_bytes_by_node": stats["pool_bytes_by_node"],
            **{key: stats[key] for key in ("hits", "misses", "loads", "offloads")}}


class WeightPoolCollector:
    """The weight pool's series, read from the registry at scrape time:

        blockserve_pool_bytes{node}                          weight bytes in the object store
        blockserve_pool_entries                              unique components pooled
        blockserve_pool_hits_total / _misses_total           acquires served from the pool /
                                                             needing a load
        blockserve_pool_loads_total                          loads from storage into the pool
        blockserve_pool_offloads_total                       components dropped by replicas
        blockserve_pool_resident_bytes{replica,device,entry} bytes held by each replica

    Counters restart from zero when the registry restarts (Prometheus' rate() handles that).
    `stats` returns the registry's stats (None: no registry); tests give a fake.
    """

    def __init__(self, stats: Callable[[], dict[str, Any] | None] | None = None) -> None:
        self._stats = stats or (lambda: registry_stats(timeout_s=1.0))

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self._stats()
        if stats is None:
            return
        pool = GaugeMetricFamily("blockserve_pool_bytes", "Weight bytes in the object store.",
                                 labels=["node"])
        for node, count in sorted(stats["pool_bytes_by_node"].items()):
            pool.add_metric([node], count)
        yield pool
        yield GaugeMetricFamily("blockserve_pool_entries", "Unique components in the pool.",
                                value=len(stats["entries"]))
        for name, text in (("hits", "Acquires served from the pool."),
                           ("misses", "Acquires that needed a load."),
                           ("loads", "Components loaded from storage into the pool."),
                           ("offloads", "Pooled components dropped by replicas.")):
            yield CounterMetricFamily(f"blockserve_pool_{name}", text, value=stats[name])
        resident = GaugeMetricFamily("blockserve_pool_resident_bytes",
                                     "Pooled weight bytes held by each replica, by device.",
                                     labels=["replica", "device", "entry"])
        for replica, state in stats["replicas"].items():
            for entry, devices in sorted(state["resident"].items()):
                for device, count in sorted(devices.items()):
                    resident.add_metric([replica, device, entry], count)
        yield resident


def registry_stats(timeout_s: float = 2.0) -> dict[str, Any] | None:
    """`deployments.weight_pool.registry_stats`, imported late: that module needs Ray."""
    from deployments.weight_pool import registry_stats as stats

    return stats(timeout_s)


def deployment_replicas() -> dict[str, int]:
    """Running replicas per deployment name, from Serve's status (empty if unavailable)."""
    try:
        from ray import serve

        status = serve.status()
    except Exception:  # outside a Serve cluster
        return {}
    counts: dict[str, int] = {}
    for application in status.applications.values():
        for name, deployment in application.deployments.items():
            counts[name] = int(deployment.replica_states.get("RUNNING", 0))
    return counts


def heavy_models(models: ModelsFile) -> dict[str, dict[str, Any]]:
    """The deployments' view of the models file: plain data, checkpoints written."""
    heavy = {name: config for name, config in models.models.items()
             if config.family not in RAY_FAMILIES_SKIPPED}
    for name, config in heavy.items():
        if config.loras:
            # The adapters would have to load where the denoiser and text encoder run, and a
            # request's adapters travel with its remote calls: not built yet.
            raise ModelsFileError(f"models.{name}.loras: LoRA adapters are served in "
                                  "embedded mode only (not with --ray yet)")
    return {name: {"path": ensure_checkpoint(config), "dtype": config.dtype,
                   "device": config.device} for name, config in heavy.items()}


def _router_class() -> Any:
    from ray import serve

    @serve.deployment(name="Router", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.25})
    @serve.ingress()
    class Router:
        """The HTTP ingress: embedded mode's app with a `RayPlacement`."""

        def __init__(self, text_encoder: Any, denoiser: Any, vae: Any,
                     models_file: str | None = None, concurrency: int = 16) -> None:
            self.handles = {"TextEncoder": text_encoder, "Denoiser": denoiser, "VAE": vae}
            self.models_file = models_file
            self.concurrency = concurrency

        def __serve_build_asgi_app__(self) -> Any:
            from service.app import create_app

            settings = Settings.from_env(models_file=self.models_file)
            models = load_models_file(settings.models_file)
            return create_app(settings, models,
                              placement=RayPlacement(self.handles, self.concurrency))

    return Router


def build_app(args: dict[str, Any]) -> Any:
    """The Serve application: `args` may set `models_file`, `concurrency`,
    `max_batch_size` and `batch_wait_timeout_s` (the Denoiser's `@serve.batch`), and
    `weight_pool` (`deployments.heavy`: enabled, idle_offload_s, memory_budget_bytes,
    heartbeat_s)."""
    from deployments.heavy import VAE, Denoiser, TextEncoder

    settings = Settings.from_env(models_file=args.get("models_file"))
    models = load_models_file(settings.models_file)
    heavy = heavy_models(models)
    # `serve run` applies the YAML's per-deployment options itself; `blockserve serve --ray`
    # passes them here (same keys as Serve's config file).
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"}
               for d in args.get("deployments") or []}

    def placed(deployment: Any) -> Any:
        extra = options.get(deployment.name)
        return deployment.options(**extra) if extra else deployment

    pool = args.get("weight_pool") or {}
    denoiser = placed(Denoiser).bind(
        heavy, max_batch_size=int(args.get("max_batch_size", 8)),
        batch_wait_timeout_s=float(args.get("batch_wait_timeout_s", 0.02)), weight_pool=pool)
    return placed(_router_class()).bind(
        placed(TextEncoder).bind(heavy, weight_pool=pool), denoiser,
        placed(VAE).bind(heavy, weight_pool=pool),
        models_file=str(settings.models_file), concurrency=int(args.get("concurrency", 16)),
    )


def init_local_ray(**options: Any) -> None:
    """`ray.init` of a one-machine cluster whose every port listens on loopback only.

    Ray replaces a loopback `_node_ip_address` with the machine's address, and its GCS,
    raylet, workers and agents then listen on every interface — ports that anyone who can
    reach the machine could call. With clusters switched off
    (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, what Ray does on macOS and Windows) the node's
    address is 127.0.0.1 and each of them binds it. Set in the environment so the processes
    Ray starts inherit it. A real cluster is started by `ray start`, not here.
    """
    import ray

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray.init(include_dashboard=False, configure_logging=False, **options)


DEFAULT_SERVE_CONFIG = Path(__file__).resolve().parent.parent / "deployments" / "serve_config.yaml"


def serve_ray(settings: Settings, config_path: Path | None = None,
              num_cpus: float | None = None) -> None:
    """`blockserve serve --ray`: a local Ray cluster on loopback, the application deployed
    with the Serve config's options, HTTP on `settings.host:port`, until Ctrl-C / SIGTERM;
    then Serve and the cluster shut down."""
    import signal

    import ray
    import yaml
    from ray import serve

    config = yaml.safe_load(Path(config_path or DEFAULT_SERVE_CONFIG).read_text())
    application = config["applications"][0]
    args = {**(application.get("args") or {}), "models_file": str(settings.models_file),
            "deployments": application.get("deployments")}
    stop = threading.Event()
    # The Router replicas read their settings from the environment, which Ray's worker
    # processes inherit from this one: pass on what the command line set.
    os.environ.update({"BLOCKSERVE_HOST": settings.host, "BLOCKSERVE_PORT": str(settings.port)})
    init_local_ray(num_cpus=num_cpus)
    # After ray.init, which installs its own (crash-reporting) SIGTERM handler.
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port,
                                  "keep_alive_timeout_s": max(1, int(settings.keep_alive_seconds))})
        serve.run(build_app(args), name=application.get("name", "blockserve"),
                  route_prefix=application.get("route_prefix", "/"))
        print(f"blockserve: serving on Ray at http://{settings.host}:{settings.port} "
              "(Ctrl-C stops)", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        print("blockserve: shutting down Serve and the local Ray cluster", flush=True)
        try:
            serve.shutdown()
        finally:
            from deployments.weight_pool import shutdown_registry

            shutdown_registry()
            ray.shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
