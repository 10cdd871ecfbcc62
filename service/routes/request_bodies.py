"""Reading request bodies and documenting them, shared by the routes that take images requests.

Bodies are parsed here rather than by FastAPI, so every failure gets a precise message in
OpenAI's error shape (`service.errors`); their schemas still go into /openapi.json by hand.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
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


async def read_json(request: Request) -> Any:
    body = await request.body()
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise APIError(400, f"request body is not valid JSON: {error}", None,
                       "invalid_json") from None


def parse_body(model: type[BaseModel], payload: Any) -> Any:
    if not isinstance(payload, dict):
        raise APIError(400, "request body must be a JSON object", None, "invalid_json")
    try:
        return model.model_validate(payload)
    except ValidationError as error:
        raise validation_error(error, model) from None


def unsupported_media(expected: str) -> APIError:
    return APIError(415, f"Content-Type must be {expected}", None, "unsupported_media_type")


def file_url(request: Request) -> FileURL:
    return lambda file_id: str(request.url_for("get_file", file_id=file_id))


def model_for(ctx: ServiceContext, request: Request, name: str | None) -> LoadedModel:
    model_name = resolve_model(ctx.registry, name)
    request.state.model = model_name  # a configured name: safe as a metric label
    return ready_model(ctx.registry, model_name)
