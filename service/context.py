"""What the routes of one app share: settings, models, engine, metrics and the file store.

Stored on `app.state.service` by `create_app`; routes get it with `Depends(service_context)`.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from service.engine import Engine
from service.file_store import FileStore
from service.metrics import ServiceMetrics
from service.registry import ModelRegistry
from service.settings import Settings


@dataclass
class ServiceContext:
    settings: Settings
    registry: ModelRegistry
    engine: Engine
    metrics: ServiceMetrics
    files: FileStore
    created: int  # when the app was made: the `created` of every model card


def service_context(request: Request) -> ServiceContext:
    return request.app.state.service
