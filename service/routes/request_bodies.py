"""Reading request bodies and documenting them, shared by the routes that take images requests.

Bodies are parsed here rather than by FastAPI, so every failure gets a precise message in
OpenAI's error shape (`service.errors`); their schemas still go into /openapi.json by hand.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ValidationError

from service.context import ServiceContext
from service.errors import APIError, ErrorResponse, validation_error
from service.generation import FileURL
from service.registry import LoadedModel
from service.validation import ready_model, resolve_model

MULTIPART = "multipart/form-data"
JSON = "application/json"

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "Invalid request: the message names the field and what is allowed.",
        401: "Missing or invalid API key.",
        404: "Unknown model or file.",
        413: "Request body too large.",
        415: "Unsupported content type.",
        429: "The queue is full; see Retry-After.",
        500: "Unexpected server error (logged with the request id).",
        503: "Model loading, or the server shutting down; see Retry-After.",
        504: "Generation took longer than the request timeout.",
    }.items()
}


def json_body_doc(schema: str) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {
        JSON: {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}}


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


# Parsing a body this large runs off the event loop, so a big (or deeply nested) document
# can't stall /healthz and every other request while it is read.
_PARSE_ON_LOOP_BYTES = 64 * 1024


class _OversizedInteger:
    """An integer literal longer than Python converts (`sys.get_int_max_str_digits`): kept as
    a marker so the error can name the field it was given for."""

    def __init__(self, digits: int) -> None:
        self.digits = digits


def _parse_int(text: str) -> int | _OversizedInteger:
    digits = len(text.lstrip("-"))
    limit = sys.get_int_max_str_digits()
    return _OversizedInteger(digits) if limit and digits > limit else int(text)


def _find_oversized(value: Any, path: str = "") -> tuple[str, _OversizedInteger] | None:
    if isinstance(value, _OversizedInteger):
        return path, value
    items = (value.items() if isinstance(value, dict)
             else enumerate(value) if isinstance(value, list) else ())
    for key, item in items:
        found = _find_oversized(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def parse_json(body: bytes) -> Any:
    """A JSON body -> Python values; every failure is a 400 (naming the field if it has one)."""
    try:
        payload = json.loads(body, parse_int=_parse_int)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise APIError(400, f"request body is not valid JSON: {error}", None,
                       "invalid_json") from None
    found = _find_oversized(payload)
    if found is not None:
        path, marker = found
        where = f"'{path}'" if path else "the body"
        raise APIError(400, f"invalid {where}: an integer of {marker.digits} digits is out of "
                       "range", path or None, "invalid_value")
    return payload


async def read_json(request: Request) -> Any:
    body = await request.body()
    if len(body) > _PARSE_ON_LOOP_BYTES:
        return await run_in_threadpool(parse_json, body)
    return parse_json(body)


def parse_body(model: type[BaseModel], payload: Any) -> Any:
    if not isinstance(payload, dict):
        raise APIError(400, "request body must be a JSON object", None, "invalid_json")
    try:
        return model.model_validate(payload)
    except ValidationError as error:
        raise validation_error(error, model) from None


def unsupported_media(expected: str) -> APIError:
    return APIError(415, f"Content-Type must be {expected}", None, "unsupported_media_type")


def public_url(request: Request, route: str, **params: str) -> str:
    """The URL of `route` as clients should use it: the configured base (`Settings.base_url`)
    and the route's path. Not `request.url_for`, which trusts the Host header: a client
    sending `Host: evil.example` would get links to evil.example."""
    settings = request.app.state.service.settings
    return settings.base_url() + str(request.app.url_path_for(route, **params))


def file_url(request: Request) -> FileURL:
    return lambda file_id: public_url(request, "get_file", file_id=file_id)


def model_for(ctx: ServiceContext, request: Request, name: str | None) -> LoadedModel:
    model_name = resolve_model(ctx.registry, name)
    request.state.model = model_name  # a configured name: safe as a metric label
    return ready_model(ctx.registry, model_name)
