"""The pages a person opens: the playground at `/`, and the API docs at `/docs` (Swagger UI)
and `/redoc`, all served by the app itself so they work offline.

The playground is three small files in `service/playground/` (no framework, no build step)
that call the public API like any client. Swagger UI's and Redoc's assets come from the
`fastapi-offline` package, never from a CDN. All open (no API key): the playground asks for
one when the server wants it, and the docs only read /openapi.json.

Not handled here: what the API does (the other routes).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

PLAYGROUND = Path(__file__).resolve().parents[1] / "playground"
DOCS_ASSETS = "/static/docs"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def playground() -> FileResponse:
    return FileResponse(PLAYGROUND / "index.html", media_type="text/html")


def install_pages(app: FastAPI) -> None:
    """The playground, its assets, and offline Swagger UI and Redoc (the app must be made
    with `docs_url=None, redoc_url=None`)."""
    app.include_router(router)
    app.mount("/static/playground", StaticFiles(directory=PLAYGROUND), name="playground")
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(files("fastapi_offline") / "static")),
              name="docs-assets")
    title = f"{app.title} — API docs"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json", title=title,
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png")

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=app.openapi_url or "/openapi.json", title=title,
            redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{DOCS_ASSETS}/favicon.png", with_google_fonts=False)
