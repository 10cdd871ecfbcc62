"""`GET /healthz` (the process answers), `GET /readyz` (every model is loaded: else 503),
`GET /metrics` (Prometheus text). All open: no API key, so probes and scrapers need none.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from service.context import ServiceContext, service_context
from service.metrics import CONTENT_TYPE

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: 200 once every configured model is loaded, else 503",
    responses={503: {"description": "Models still loading, or one failed to load."}},
)
async def readyz(ctx: ServiceContext = Depends(service_context)) -> Any:  # noqa: B008
    ready = ctx.registry.ready
    body = {"status": "ready" if ready else "not ready", "models": ctx.registry.states()}
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
