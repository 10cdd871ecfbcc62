"""What the routes of one app share: settings, models, engine, placement, metrics, files,
jobs and the exact-repeat result cache.

Stored on `app.state.service` by `create_app`; routes get it with `Depends(service_context)`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from fastapi import Request

from service.engine import Engine
from service.file_store import FileStore
from service.image_io import DecodeGate
from service.job_store import JobStore
from service.metrics import ServiceMetrics
from service.placement import Placement
from service.registry import ModelRegistry
from service.result_cache import ResultCache
from service.settings import Settings


@dataclass
class ServiceContext:
    settings: Settings
    registry: ModelRegistry
    engine: Engine
    metrics: ServiceMetrics
    files: FileStore
    jobs: JobStore
    created: int  # when the app was made: the `created` of every model card
    placement: Placement  # where blocks run
    decodes: DecodeGate | None = None  # bounds input-image decoding (None: unbounded)
    # exact repeats (off when its bound is 0)
    results: ResultCache = field(default_factory=lambda: ResultCache(0))
    background: set[asyncio.Task[None]] = field(default_factory=set)  # jobs being tracked


def service_context(request: Request) -> ServiceContext:
    return request.app.state.service
