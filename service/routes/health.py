"""`GET /healthz` (the process answers), `GET /readyz` (every model is loaded and, in Ray mode,
every deployment has a replica able to serve: else 503), `GET /metrics` (Prometheus text). All
open: no API key, so probes and scrapers need none.

`/readyz` names each model's state to anyone, but why a model failed (exception text, which
can hold paths) only to callers with an API key (or when authentication is off); the server
log always has it.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from service.auth import is_authorized
from service.context import ServiceContext, service_context
from service.metrics import CONTENT_TYPE

router = APIRouter(tags=["health"])
_HIDDEN = "failed to load; the reason is in the server log (or send an API key to see it here)"


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: 200 once every configured model is loaded (and, in Ray mode, every "
            "deployment can serve), else 503",
    responses={503: {"description": "Models or deployments still starting, or a model "
                                    "failed to load."}},
)
async def readyz(
    request: Request, ctx: ServiceContext = Depends(service_context)  # noqa: B008
) -> Any:
    placed, placement = await run_in_threadpool(ctx.placement.ready)
    ready = ctx.registry.ready and placed
    states = ctx.registry.states()
    if not is_authorized(request):
        states = {name: {**state, "error": _HIDDEN} if "error" in state else state
                  for name, state in states.items()}
    body: dict[str, Any] = {"status": "ready" if ready else "not ready", "models": states}
    if placement:
        body["placement"] = placement
    return JSONResponse(body, status_code=200 if ready else 503,
                        headers={} if ready else {"Retry-After": "5"})


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}},
)
async def metrics(ctx: ServiceContext = Depends(service_context)) -> Response:  # noqa: B008
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)
