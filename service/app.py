"""`create_app(settings)`: the FastAPI app of the image-generation API, in either mode.

It wires one process's pieces together: the models file → a `ModelRegistry` (one shared
`ComponentsManager`, models loaded on a background thread at startup so `/readyz` can say 503
until they are), the `Engine` running jobs on the placement's runner (embedded by default:
everything in this process; Ray mode passes `service.ray_placement.RayPlacement`), with the
test-only fault hooks when `test_hooks` is set, never otherwise, per-app Prometheus metrics,
the url-image store, the `/v1/jobs` store, the input-image decode gate, the exact-repeat
result cache, the routes, error handlers and the request
middleware. Nothing is global: two apps in one process are independent (tests rely on it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from blocks import ComponentsManager
from service import __version__
from service.context import ServiceContext
from service.engine import Engine
from service.errors import install_error_handlers
from service.file_store import FileStore
from service.image_io import DecodeGate
from service.job_store import JobStore
from service.metrics import ServiceMetrics
from service.middleware import ServiceMiddleware
from service.models_file import ModelsFile, load_models_file
from service.openapi import build_openapi
from service.placement import EmbeddedPlacement, Placement
from service.registry import READY, ModelRegistry
from service.result_cache import ResultCache
from service.routes import health as health_routes
from service.routes import images as image_routes
from service.routes import jobs as job_routes
from service.routes import models as model_routes
from service.routes.pages import install_pages
from service.settings import Settings

DESCRIPTION = (
    "OpenAI-compatible image generation served by blockserve's composable pipeline blocks. "
    "Extensions to OpenAI's fields: negative_prompt, num_inference_steps, guidance_scale, "
    "seed, scheduler, strength; background jobs with progress events (/v1/jobs). Errors use "
    "OpenAI's shape."
)


def create_app(
    settings: Settings | None = None,
    models: ModelsFile | None = None,
    engine: Engine | None = None,
    placement: Placement | None = None,
) -> FastAPI:
    """The app for `settings` (default: from the environment) serving `models` (default: the
    settings' models file). Models start loading, and the engine starts, with the app.
    `placement` (default: embedded) says where blocks run."""
    settings = settings if settings is not None else Settings.from_env()
    models = models if models is not None else load_models_file(settings.models_file)
    # An ingress behind Ray Serve (any placement passed in) behaves as one: see lifespan.
    behind_serve = placement is not None
    placement = placement if placement is not None else EmbeddedPlacement()
    manager = ComponentsManager()
    metrics = ServiceMetrics(manager)
    registry = ModelRegistry(models, manager, on_components_loaded=metrics.components_loaded,
                             blocks_transform=placement.transform_blocks,
                             lora_observer=metrics.lora_event,
                             lora_loader=placement.lora_loader)
    for collector in placement.metric_collectors():
        metrics.add_collector(collector)
    if engine is None:
        step_hook = None
        if settings.test_hooks:
            from service.fault_injection import fault_injection_hook

            step_hook = fault_injection_hook
        engine = Engine(
            registry, placement.make_runner(settings), queue_size=settings.queue_size,
            max_batch_size=settings.max_batch_size, scheduling=settings.scheduling,
            observer=metrics, step_hook=step_hook,
        )
    context = ServiceContext(
        settings=settings, registry=registry, engine=engine, metrics=metrics,
        files=FileStore(settings.file_ttl_seconds, settings.file_store_bytes),
        jobs=JobStore(settings.job_ttl_seconds, settings.max_finished_jobs,
                      settings.job_store_bytes),
        created=int(time.time()), placement=placement,
        decodes=DecodeGate(settings.max_decodes, settings.max_decode_bytes),
        results=ResultCache(settings.result_cache_bytes, on_lookup=metrics.result_cache_lookup),
    )
    metrics.watch(
        queued=lambda: engine.queued,
        running=lambda: engine.running,
        ready=lambda: sum(s["state"] == READY for s in registry.states().values()),
        result_cache_bytes=lambda: context.results.nbytes,
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        loading = registry.start_loading()
        if behind_serve:
            # A Serve replica takes traffic once its startup returns (Serve has no readiness
            # probe of its own), so a Ray-mode ingress starts only once its models are loaded
            # (or failed): a replica added by autoscaling must not answer "still loading".
            await asyncio.to_thread(loading.join)
        yield
        engine.stop()

    # redirect_slashes off: Starlette's redirect to the slash-less path is an absolute URL
    # built from the client's Host header.
    app = FastAPI(title="blockserve", version=__version__, description=DESCRIPTION,
                  lifespan=lifespan, docs_url=None, redoc_url=None,  # offline: install_pages
                  redirect_slashes=False)
    app.state.service = context
    app.state.placement = placement
    install_error_handlers(app)
    app.include_router(image_routes.router)
    app.include_router(job_routes.router)
    app.include_router(model_routes.router)
    app.include_router(health_routes.router)
    install_pages(app)
    app.add_middleware(ServiceMiddleware, max_body_bytes=settings.max_body_bytes,
                       metrics=metrics, read_timeout_s=settings.read_timeout_seconds,
                       # Ray Serve's proxy returns the request id itself (the same one).
                       echo_request_id=not behind_serve)
    app.openapi = lambda: build_openapi(app, registry)  # type: ignore[method-assign]
    return app
