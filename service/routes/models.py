"""`GET /v1/models` and `GET /v1/models/{model_id}`: what is served, and how.

The detail view adds the model's workflows, schedulers, sizes, defaults, limits, step-cache
methods and its block tree (every block with its inputs and outputs), read from the loaded
pipeline.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool

from blocks.step_cache import OFF
from service.auth import require_api_key
from service.context import ServiceContext, service_context
from service.errors import APIError
from service.registry import READY, ModelNotReady
from service.routes.images import ERROR_RESPONSES
from service.schemas import ModelDetail, ModelList

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["models"])


def _card(ctx: ServiceContext, name: str) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": ctx.created,
        "owned_by": "blockserve",
        "family": ctx.registry.config(name).family,
        "ready": ctx.registry.state(name) == READY,
        "aliases": list(ctx.registry.config(name).aliases),
    }


@router.get("/models", response_model=ModelList, responses=ERROR_RESPONSES,
            summary="The configured models")
async def list_models(ctx: ServiceContext = Depends(service_context)) -> Any:  # noqa: B008
    return {"object": "list", "data": [_card(ctx, name) for name in ctx.registry.names]}


@router.get("/models/{model_id}", response_model=ModelDetail, responses=ERROR_RESPONSES,
            summary="One model: workflows, schedulers, limits and its block tree")
async def get_model(
    model_id: str, request: Request,
    ctx: ServiceContext = Depends(service_context),  # noqa: B008
) -> Any:
    if model_id not in ctx.registry.names:
        raise APIError(404, f"model '{model_id}' is not served here; available: "
                       f"{', '.join(ctx.registry.names)}", "model_id", "model_not_found")
    config = ctx.registry.config(model_id)
    detail: dict[str, Any] = {
        **_card(ctx, model_id),
        "workflows": [],
        "schedulers": [],
        "default_scheduler": None,
        "sizes": list(config.allowed_sizes),
        "defaults": config.defaults.model_dump(),
        "limits": config.limits.model_dump(),
        "blocks": None,
        "loras": [{"name": name, "scale": entry.scale, "loaded": False}
                  for name, entry in config.loras.items()],
        "max_loaded_loras": config.max_loaded_loras,
    }
    try:
        loaded = ctx.registry.get(model_id)
    except ModelNotReady:
        return detail
    detail.update(
        workflows=list(loaded.workflows),
        schedulers=list(loaded.schedulers),
        default_scheduler=loaded.default_scheduler,
        blocks=loaded.tree,
        step_cache={"methods": list(loaded.step_cache_methods),
                    "default": OFF if loaded.step_cache is None else loaded.step_cache.as_dict()},
    )
    if loaded.loras is not None:
        detail["loras"] = loaded.loras.describe()
    placement = getattr(request.app.state, "placement", None)
    described = None if placement is None else \
        await run_in_threadpool(placement.describe, model_id)
    if described is not None:  # Ray mode: where its heavy blocks run
        detail["placement"] = described
    return detail
