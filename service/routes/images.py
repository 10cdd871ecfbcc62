"""`POST /v1/images/generations`, `POST /v1/images/edits` and `GET /v1/files/{id}`.

Request flow: content type and body → schema (`service.schemas`) → model and workflow →
checks against the model and a job (`service.validation`) → the engine → encoded images, as
base64 or as short-lived URLs. Bodies are parsed here rather than by FastAPI so every failure
gets a precise message in OpenAI's error shape; their schemas are still in /openapi.json.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from PIL import Image
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from blocks import GenerationCancelled
from service.auth import require_api_key
from service.context import ServiceContext, service_context
from service.engine import EngineBusy
from service.errors import APIError, ErrorResponse, validation_error
from service.image_io import b64, decode_base64_image, decode_image, encode_image, media_type
from service.jobs import GenerationJob, GenerationResult
from service.registry import LoadedModel
from service.schemas import (
    ImageEditRequest,
    ImageGenerationRequest,
    ImageRequestFields,
    ImagesResponse,
)
from service.validation import build_job, edit_workflow, ready_model, resolve_model

logger = logging.getLogger(__name__)

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "Invalid request: the message names the field and what is allowed.",
        401: "Missing or invalid API key.",
        404: "Unknown model or file.",
        413: "Request body too large.",
        415: "Unsupported content type.",
        500: "Unexpected server error (logged with the request id).",
        503: "Model loading or engine busy; see Retry-After.",
        504: "Generation took longer than the request timeout.",
    }.items()
}
_POLL_SECONDS = 0.25
MULTIPART = "multipart/form-data"
JSON = "application/json"

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["images"])


def _json_body_doc(schema: str) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {
        JSON: {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}}


def _edit_body_doc() -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {
        MULTIPART: {"schema": {"$ref": "#/components/schemas/ImageEditForm"}},
        JSON: {"schema": {"$ref": "#/components/schemas/ImageEditRequest"}},
    }}}


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _read_json(request: Request) -> Any:
    body = await request.body()
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise APIError(400, f"request body is not valid JSON: {error}", None,
                       "invalid_json") from None


def _parse(model: type[BaseModel], payload: Any) -> Any:
    if not isinstance(payload, dict):
        raise APIError(400, "request body must be a JSON object", None, "invalid_json")
    try:
        return model.model_validate(payload)
    except ValidationError as error:
        raise validation_error(error, model) from None


def _unsupported_media(expected: str) -> APIError:
    return APIError(415, f"Content-Type must be {expected}", None, "unsupported_media_type")


async def _submit_and_wait(ctx: ServiceContext, request: Request,
                           job: GenerationJob) -> GenerationResult:
    """Run `job` on the engine; cancel it if the client leaves or it runs past the timeout."""
    try:
        future = ctx.engine.submit(job)
    except EngineBusy as error:
        raise APIError(503, f"server busy: {error}; retry later", None, "server_busy",
                       {"Retry-After": "2"}) from None
    waiting = asyncio.wrap_future(future)
    deadline = time.monotonic() + ctx.settings.request_timeout_seconds
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=_POLL_SECONDS)
        if done:
            break
        if time.monotonic() > deadline:
            job.cancel()  # stops a running job at its next step
            waiting.cancel()  # and drops a queued one (cancels `future` too)
            raise APIError(504, f"generation took longer than "
                           f"{ctx.settings.request_timeout_seconds:g}s and was cancelled",
                           None, "timeout")
        if await request.is_disconnected():
            job.cancel()
            waiting.cancel()
            raise APIError(499, "client closed the request", None, "client_closed")
    try:
        return waiting.result()
    except GenerationCancelled:
        raise APIError(499, "generation cancelled", None, "cancelled") from None
    except EngineBusy as error:  # queued when the engine stopped
        raise APIError(503, f"server busy: {error}; retry later", None, "server_busy",
                       {"Retry-After": "2"}) from None
    except ValueError as error:
        # Blocks reject inputs they can't use with a ValueError naming the block and the valid
        # values (e.g. a reference image too small): the client's input, so a 400, not a 500.
        logger.info("request %s: model %s rejected its inputs: %s",
                    request.state.request_id, job.model, error)
        raise APIError(400, f"model '{job.model}' rejected the request: {error}", None,
                       "invalid_input") from None


async def _respond(ctx: ServiceContext, request: Request, fields: ImageRequestFields,
                   job: GenerationJob, result: GenerationResult) -> dict[str, Any]:
    output_format = fields.output_format or "png"

    def encode() -> list[bytes]:
        return [encode_image(image, output_format, fields.output_compression)
                for image in result.images]

    encoded = await run_in_threadpool(encode)
    data = []
    for blob, seed in zip(encoded, result.seeds, strict=True):
        if (fields.response_format or "b64_json") == "url":
            file_id = ctx.files.put(blob, media_type(output_format))
            data.append({"url": str(request.url_for("get_file", file_id=file_id)), "seed": seed})
        else:
            data.append({"b64_json": b64(blob), "seed": seed})
    ctx.metrics.images_generated.labels(job.model).inc(len(result.images))
    logger.info("request %s: %s %s n=%d %dx%d steps=%d seed=%d in %.2fs (user %s)",
                request.state.request_id, job.model, job.workflow, job.n, job.width,
                job.height, job.steps, job.seed, result.seconds, fields.user or "-")
    return {"created": int(time.time()), "data": data, "model": job.model,
            "size": f"{job.width}x{job.height}", "output_format": output_format}


def _model_for(ctx: ServiceContext, request: Request, name: str | None) -> LoadedModel:
    model_name = resolve_model(ctx.registry, name)
    request.state.model = model_name  # a configured name: safe as a metric label
    return ready_model(ctx.registry, model_name)


@router.post(
    "/images/generations",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses=ERROR_RESPONSES,
    openapi_extra=_json_body_doc("ImageGenerationRequest"),
    summary="Create images from a prompt (OpenAI-compatible)",
)
async def create_images(
    request: Request, ctx: ServiceContext = Depends(service_context)  # noqa: B008
) -> Any:
    request.state.workflow = "text2image"
    if _content_type(request) != JSON:
        raise _unsupported_media(JSON)
    fields = _parse(ImageGenerationRequest, await _read_json(request))
    model = _model_for(ctx, request, fields.model)
    job = build_job(fields, model, "text2image")
    result = await _submit_and_wait(ctx, request, job)
    return await _respond(ctx, request, fields, job, result)


async def _edit_inputs(
    request: Request,
) -> tuple[ImageEditRequest, Image.Image, Image.Image | None]:
    """(the fields, the decoded image, the decoded mask) from a multipart or JSON body."""
    content_type = _content_type(request)
    if content_type == JSON:
        fields = _parse(ImageEditRequest, await _read_json(request))
        image = await run_in_threadpool(decode_base64_image, fields.image, "image")
        mask = None
        if fields.mask is not None:
            mask = await run_in_threadpool(decode_base64_image, fields.mask, "mask")
        return fields, image, mask
    if content_type != MULTIPART:
        raise _unsupported_media(f"{MULTIPART} (files) or {JSON} (base64)")
    max_bytes = request.app.state.service.settings.max_body_bytes
    try:
        form = await request.form(max_files=4, max_fields=64, max_part_size=max_bytes)
    except APIError:
        raise
    except Exception as error:  # python-multipart's errors: a malformed body
        raise APIError(400, f"malformed multipart body: {error}", None,
                       "invalid_multipart") from None
    payload: dict[str, Any] = {}
    files: dict[str, list[Any]] = {}
    for key, value in form.multi_items():
        name = key[:-2] if key.endswith("[]") else key  # OpenAI's client sends image[] lists
        if isinstance(value, UploadFile) or name in ("image", "mask"):
            files.setdefault(name, []).append(value)
        else:
            payload[name] = value
    decoded: dict[str, Image.Image] = {}
    for name, values in files.items():
        if name not in ("image", "mask"):
            raise APIError(400, f"unexpected file field '{name}'; files: image, mask", name,
                           "unknown_parameter")
        if len(values) != 1:
            raise APIError(400, f"send exactly one '{name}', got {len(values)}", name,
                           "invalid_value")
        value = values[0]
        if isinstance(value, UploadFile):
            data = await value.read()
            decoded[name] = await run_in_threadpool(decode_image, data, name)
        else:
            decoded[name] = await run_in_threadpool(decode_base64_image, value, name)
        payload[name] = "(file)"
    if "image" not in decoded:
        raise APIError(400, "missing required parameter 'image' (a file)", "image",
                       "missing_required_parameter")
    return _parse(ImageEditRequest, payload), decoded["image"], decoded.get("mask")


@router.post(
    "/images/edits",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses=ERROR_RESPONSES,
    openapi_extra=_edit_body_doc(),
    summary="Edit an image: image-to-image, inpainting or image-conditioned generation",
)
async def edit_images(
    request: Request, ctx: ServiceContext = Depends(service_context)  # noqa: B008
) -> Any:
    fields, image, mask = await _edit_inputs(request)
    model = _model_for(ctx, request, fields.model)
    workflow = edit_workflow(model, mask is not None)
    request.state.workflow = workflow
    job = await run_in_threadpool(build_job, fields, model, workflow, image, mask)
    result = await _submit_and_wait(ctx, request, job)
    return await _respond(ctx, request, fields, job, result)


@router.get(
    "/files/{file_id}",
    name="get_file",
    responses={**ERROR_RESPONSES, 200: {"content": {"image/png": {}, "image/jpeg": {},
                                                     "image/webp": {}},
                                        "description": "The image."}},
    response_class=Response,
    summary="An image made with response_format=url, while it lasts",
)
async def get_file(
    file_id: str, ctx: ServiceContext = Depends(service_context)  # noqa: B008
) -> Response:
    stored = ctx.files.get(file_id)
    if stored is None:
        raise APIError(404, f"file '{file_id}' does not exist or has expired "
                       f"(files last {ctx.settings.file_ttl_seconds:g}s)", "file_id",
                       "file_not_found")
    return Response(stored.data, media_type=stored.media_type,
                    headers={"Cache-Control": "private, max-age=60"})
