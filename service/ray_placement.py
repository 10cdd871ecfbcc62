"""Distributed mode: the same FastAPI app, as the Ray Serve ingress, with heavy blocks remote.

    serve run deployments/serve_config.yaml          # or: blockserve serve --ray

`build_app(args)` is the Serve application builder the YAML names. It reads the application's
arguments once (`deployments.app_config.ServeAppConfig`: unknown keys are an error), reads the
models file, writes tiny checkpoints where asked, and binds one `TextEncoder`, `Denoiser` and
`VAE` deployment (`deployments.heavy`) plus the `Router`: the ingress whose ASGI app is
`create_app(settings, models, placement=RayPlacement(handles))`.

`RayPlacement` swaps each model's heavy top-level blocks (those its family declares,
`Family.heavy_blocks`) for `RemoteBlock`s on the deployment of their role (the light ones run
in the router) and brings the `RayRunner` the engine runs on — the very engine of embedded
mode (`service.engine`): its queue, positions, jobs, events, cancellation and timeouts. The
runner runs the engine's merged stages (text encoding, decoding) as remote calls from a pool
of threads, and each job's denoise block as a stream from a `Denoiser` replica, whose step
scheduler batches every router's requests step by step; the steps stream back, so jobs get
per-step progress, previews and metrics exactly as in embedded mode. A model whose blocks stay
in the router (a weight-free family) steps on a local scheduler.

`/readyz` asks the placement too: ready only once every deployment answers from a running
replica (a replica answers only after loading its models).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from blocks import ModularPipelineBlocks, PipelineState
from blocks.families import DENOISER, TEXT_ENCODER
from blocks.families import VAE as VAE_ROLE
from blocks.latent_rgb import LatentRGB
from deployments.app_config import ServeAppConfig
from deployments.lora_cache import RemoteLoraLoader
from deployments.lora_events import EVENTS, LoraEventRow
from deployments.remote_block import (
    ROLE_DEPLOYMENTS,
    RemoteBlock,
    remote_pipeline_blocks,
)
from service.metrics import LORA_SERIES
from service.models_file import ModelsFile, load_models_file
from service.placement import DenoiseRequest, LocalRunner
from service.registry import ensure_checkpoint
from service.settings import Settings

logger = logging.getLogger(__name__)

READY_PROBE_TIMEOUT_S = 2.0
READY_CACHE_S = 2.0
PREVIEW_FIT_TIMEOUT_S = 30.0


class RayRunner:
    """The engine's stages in Ray mode (see the module docstring)."""

    def __init__(self, concurrency: int, batch_window_s: float, vae: Any = None) -> None:
        self.concurrency = concurrency
        self._vae = vae  # the VAE deployment's handle: it fits the preview maps
        self._stages: ThreadPoolExecutor | None = None
        self._local = LocalRunner(batch_window_s=batch_window_s)  # models run in the router
        self._maps: dict[str, LatentRGB | None] = {}
        self._maps_lock = threading.Lock()

    def start(self) -> None:
        if self._stages is None:
            self._stages = ThreadPoolExecutor(max(4, self.concurrency),
                                              thread_name_prefix="blockserve-ray-stage")
        self._local.start()

    def stop(self) -> None:
        if self._stages is not None:
            self._stages.shutdown(wait=False, cancel_futures=True)
            self._stages = None
        self._local.stop()

    def capacity(self, cap: int) -> int:
        return self.concurrency

    def worker(self) -> int:
        return 0  # the router's pipelines hold no thread-unsafe components of their own

    def run(self, fn: Callable[[], None]) -> None:
        assert self._stages is not None, "the runner is not started"
        self._stages.submit(fn)

    def preview_map(self, model: Any) -> LatentRGB | None:
        remote = any(isinstance(block, RemoteBlock)
                     for block in getattr(model.blocks, "sub_blocks", {}).values())
        if not remote or self._vae is None:
            return self._local.preview_map(model)
        with self._maps_lock:
            if model.name not in self._maps:
                try:
                    self._maps[model.name] = self._vae.latent_rgb.remote(model.name).result(
                        timeout_s=PREVIEW_FIT_TIMEOUT_S)
                except Exception as error:  # no previews for now; asked again next time
                    logger.warning("model %s: no preview map from the VAE deployment (%s)",
                                   model.name, type(error).__name__)
                    return None
            return self._maps[model.name]

    def denoise(self, request: DenoiseRequest) -> Callable[[], None]:
        if not isinstance(request.block, RemoteBlock):
            return self._local.denoise(request)
        stream = request.block.stream(request.components, request.state, request.options)
        listener = request.listener

        def follow() -> None:
            try:
                for item in stream:
                    if isinstance(item, PipelineState):
                        listener.finished(item)
                        return
                    if listener.stopped():
                        stream.cancel()
                        continue  # the stream ends with TaskStopped
                    try:
                        listener.step(item)
                    except Exception as error:  # e.g. a test hook: this job fails, alone
                        stream.cancel()
                        listener.failed(error)
                        return
            except Exception as error:
                listener.failed(error)

        threading.Thread(target=follow, daemon=True, name="blockserve-ray-stream").start()
        return stream.cancel


class RayPlacement:
    """Heavy blocks on the deployments behind `handles` ({deployment name: DeploymentHandle})."""

    def __init__(self, handles: dict[str, Any], config: ServeAppConfig | None = None) -> None:
        self.handles = handles
        self.config = config or ServeAppConfig()
        self._remote: dict[str, dict[str, str]] = {}  # model -> {remote block: deployment}
        self._ready: tuple[float, dict[str, Any]] | None = None
        self._lock = threading.Lock()

    def transform_blocks(self, config: Any, blocks: ModularPipelineBlocks
                         ) -> ModularPipelineBlocks:
        remote = remote_pipeline_blocks(blocks, config.name, self.handles,
                                        config.family_info.heavy_blocks)
        self._remote[config.name] = {
            name: block.deployment for name, block in getattr(remote, "sub_blocks", {}).items()
            if isinstance(block, RemoteBlock)}
        return remote

    def make_runner(self, settings: Settings) -> RayRunner:
        return RayRunner(self.config.concurrency, settings.batch_window_ms / 1000,
                         self.handles.get(ROLE_DEPLOYMENTS[VAE_ROLE]))

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """Every deployment answers a ping from a running replica (cached while ready)."""
        with self._lock:
            if self._ready is not None and time.monotonic() - self._ready[0] < READY_CACHE_S:
                return True, self._ready[1]
        states = {name: _probe(handle) for name, handle in self.handles.items()}
        ready = all(state == "ready" for state in states.values())
        detail = {"deployments": states}  # the cached answer is the same detail
        with self._lock:
            self._ready = (time.monotonic(), detail) if ready else None
        return ready, detail

    def describe(self, model: str) -> dict[str, Any] | None:
        """{block: {deployment, replicas}} for the heavy blocks of `model`, and under
        "weights" its components in the shared pool (`model_weights`)."""
        if not self._remote.get(model):
            return None
        replicas = deployment_replicas()
        described: dict[str, Any] = {
            block: {"deployment": deployment, "replicas": replicas.get(deployment)}
            for block, deployment in self._remote[model].items()}
        described["weights"] = model_weights(model, registry_stats())
        return described

    def lora_loader(self, pipeline: Any) -> RemoteLoraLoader:
        """Adapters load in the replicas that run the text encoder and denoiser."""
        return RemoteLoraLoader()

    def metric_collectors(self) -> list[Any]:
        """Extra Prometheus collectors of this placement: the weight pool's series, and the
        replicas' LoRA adapter loads and evictions."""
        return [WeightPoolCollector(), ReplicaLoraCollector()]


def _probe(handle: Any) -> str:
    """"ready" when the deployment answers a ping in time, else why not."""
    response = handle.ping.remote()
    try:
        response.result(timeout_s=READY_PROBE_TIMEOUT_S)
    except TimeoutError:
        response.cancel()
        return "no running replica answered yet"
    except Exception as error:  # the deployment is failing or gone
        return f"unavailable ({type(error).__name__})"
    return "ready"


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


class ReplicaLoraCollector:
    """The LoRA adapter loads and evictions of the TextEncoder and Denoiser replicas, read
    from the weight pool's registry at scrape time (`deployments.lora_events`), under embedded
    mode's names and labels (`service.metrics.LORA_SERIES`; the app's own counters of those
    names give way to these, `ServiceMetrics.add_collector`):

        blockserve_lora_loads_total{model,lora}       loads, per replica: two replicas loading
                                                      an adapter are two loads
        blockserve_lora_evictions_total{model,lora}   adapters a replica unloaded for room

    Each replica's counts are kept after it goes, so they only go down if the registry
    restarts (Prometheus' rate() handles that). Without the pool (`weight_pool.enabled:
    false`) there is no registry and so no series. `events` returns the registry's rows
    (None: no registry); tests give a fake.
    """

    def __init__(self, events: Callable[[], list[LoraEventRow] | None] | None = None
                 ) -> None:
        self._events = events or (lambda: registry_lora_events(timeout_s=1.0))

    def describe(self) -> Any:
        return self._families().values()

    def collect(self) -> Any:
        families = self._families()
        for event, model, lora, count in self._events() or []:
            if event in families:
                families[event].add_metric([model, lora], count)
        return families.values()

    @staticmethod
    def _families() -> dict[str, Any]:
        from prometheus_client.core import CounterMetricFamily

        return {event: CounterMetricFamily(*LORA_SERIES[event], labels=["model", "lora"])
                for event in EVENTS}


def registry_stats(timeout_s: float = 2.0) -> dict[str, Any] | None:
    """`deployments.weight_pool.registry_stats`, imported late: that module needs Ray."""
    from deployments.weight_pool import registry_stats as stats

    return stats(timeout_s)


def registry_lora_events(timeout_s: float = 2.0) -> list[LoraEventRow] | None:
    """`deployments.weight_pool.registry_lora_events`, imported late: that module needs Ray."""
    from deployments.weight_pool import registry_lora_events as events

    return events(timeout_s)


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
    # A model whose family declares no heavy blocks runs wholly in the router.
    heavy = {name: config for name, config in models.models.items()
             if config.family_info.heavy_blocks}
    # The allowed LoRA adapters too: the TextEncoder and Denoiser replicas load them.
    return {name: {"path": ensure_checkpoint(config), "family": config.family,
                   "dtype": config.dtype, "device": config.device,
                   "loras": {lora: entry.model_dump() for lora, entry in config.loras.items()},
                   "max_loaded_loras": config.max_loaded_loras}
            for name, config in heavy.items()}


def _router_class() -> Any:
    from ray import serve

    @serve.deployment(name="Router", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.25})
    @serve.ingress()
    class Router:
        """The HTTP ingress: embedded mode's app with a `RayPlacement`."""

        def __init__(self, text_encoder: Any, denoiser: Any, vae: Any,
                     config: ServeAppConfig) -> None:
            self.handles = {ROLE_DEPLOYMENTS[TEXT_ENCODER]: text_encoder,
                            ROLE_DEPLOYMENTS[DENOISER]: denoiser, ROLE_DEPLOYMENTS[VAE_ROLE]: vae}
            self.config = config

        def __serve_build_asgi_app__(self) -> Any:
            from service.app import create_app

            settings = Settings.from_env(**self.config.settings_overrides())
            models = load_models_file(settings.models_file)
            return create_app(settings, models,
                              placement=RayPlacement(self.handles, self.config))

    return Router


def build_app(args: dict[str, Any]) -> Any:
    """The Serve application for `args` (`deployments.app_config.ServeAppConfig`)."""
    from deployments.heavy import VAE, Denoiser, TextEncoder

    config = ServeAppConfig.parse(args)
    settings = Settings.from_env(**config.settings_overrides())
    models = load_models_file(settings.models_file)
    heavy = heavy_models(models)
    config = config.model_copy(update={"models_file": str(settings.models_file)})
    # `serve run` applies the YAML's per-deployment options itself; `blockserve serve --ray`
    # passes them here (same keys as Serve's config file).
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"}
               for d in config.deployments or []}

    def placed(deployment: Any) -> Any:
        extra = options.get(deployment.name)
        return deployment.options(**extra) if extra else deployment

    pool = config.weight_pool
    denoiser = placed(Denoiser).bind(heavy, weight_pool=pool,
                                     batch_window_s=settings.batch_window_ms / 1000)
    return placed(_router_class()).bind(
        placed(TextEncoder).bind(heavy, weight_pool=pool), denoiser,
        placed(VAE).bind(heavy, weight_pool=pool), config=config,
    )


def init_local_ray(**options: Any) -> None:
    """`ray.init` of a one-machine cluster whose every port listens on loopback only.

    Ray replaces a loopback `_node_ip_address` with the machine's address, and its GCS,
    raylet, workers and agents then listen on every interface — ports that anyone who can
    reach the machine could call. With clusters switched off
    (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, what Ray does on macOS and Windows) the node's
    address is 127.0.0.1 and each of them binds it. Set in the environment so the processes
    Ray starts inherit it; Ray reads it when it is first imported, so it only takes effect in
    a process that had not imported ray before. A real cluster is started by `ray start`.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    ray.init(include_dashboard=False, configure_logging=False, **options)


DEFAULT_SERVE_CONFIG = Path(__file__).resolve().parent.parent / "deployments" / "serve_config.yaml"


def serve_ray(settings: Settings, config_path: Path | None = None,
              num_cpus: float | None = None) -> None:
    """`blockserve serve --ray`: a local Ray cluster on loopback, the application deployed
    with the Serve config's options, HTTP on `settings.host:port`, until Ctrl-C / SIGTERM;
    then Serve and the cluster shut down."""
    import signal

    # Ray reads this when it is first imported: set before `import ray` (see init_local_ray).
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
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
