"""`POST /v1/images/generations`, `POST /v1/images/edits` and `GET /v1/files/{id}`.

Request flow: content type and body → schema (`service.schemas`) → model and workflow →
checks against the model and a job (`service.validation`) → the engine → encoded images, as
base64 or as short-lived URLs — or, with `stream: true`, server-sent events as OpenAI's
streaming image API sends them. Bodies are parsed here rather than by FastAPI so every failure
gets a precise message in OpenAI's error shape; their schemas are still in /openapi.json.

A client that goes away (or a request past its timeout) cancels its job: a queued job leaves
the queue at once, a running one stops at its next denoising step.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from PIL import Image
from starlette.datastructures import UploadFile

from service.auth import require_api_key
from service.context import ServiceContext, service_context
from service.errors import APIError
from service.generation import images_response, outcome_error, submit, track
from service.image_io import b64, decode_base64_image, decode_image, encode_image
from service.job_store import JobRecord, follow
from service.jobs import TIMEOUT, GenerationJob, GenerationResult
from service.previews import scaled_preview
from service.routes.request_bodies import (
    ERROR_RESPONSES,
    JSON,
    MULTIPART,
    content_type,
    file_url,
    json_body_doc,
    model_for,
    parse_body,
    read_json,
    unsupported_media,
)
from service.schemas import ImageEditRequest, ImageGenerationRequest, ImagesResponse
from service.sse import (
    KEEPALIVE,
    KEEPALIVE_SECONDS,
    MEDIA_TYPE,
    event_schema,
    sse_event,
    sse_response,
)
from service.validation import build_job, edit_workflow

logger = logging.getLogger(__name__)

_POLL_SECONDS = 0.25
# Streaming answers carry no token accounting: blockserve doesn't bill by tokens.
_NO_USAGE = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
             "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}}
IMAGE_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    200: {"description": "The images; with `stream: true`, server-sent events instead.",
          "content": {MEDIA_TYPE: {"schema": event_schema([
              f"{prefix}.{kind}" for prefix in ("image_generation", "image_edit")
              for kind in ("partial_image", "completed")] + ["error"])}}},
}

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["images"])


def _edit_body_doc() -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {
        MULTIPART: {"schema": {"$ref": "#/components/schemas/ImageEditForm"}},
        JSON: {"schema": {"$ref": "#/components/schemas/ImageEditRequest"}},
    }}}


async def _wait(ctx: ServiceContext, request: Request, job: GenerationJob) -> GenerationResult:
    """Run `job` while the client waits; cancel it if the client leaves or time runs out."""
    future = submit(ctx, job)
    waiting = asyncio.wrap_future(future)
    deadline = job.deadline
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=_POLL_SECONDS)
        if done:
            break
        if deadline is not None and time.monotonic() > deadline:
            # The engine stops the job at its next step; the client hears now, not then.
            ctx.engine.cancel(job, TIMEOUT)
            waiting.cancel()  # nobody will read its outcome
            raise APIError(504, f"generation took longer than "
                           f"{ctx.settings.request_timeout_seconds:g}s and was cancelled",
                           None, "timeout")
        if await request.is_disconnected():
            ctx.engine.cancel(job)  # frees its queue slot now, or stops it at its next step
            waiting.cancel()
            raise APIError(499, "client closed the request", None, "client_closed")
    try:
        return waiting.result()
    except Exception as error:
        api_error = outcome_error(error, job)
        if api_error is None:
            raise  # the middleware logs it with the request id and answers a plain 500
        if api_error.code == "invalid_input":
            logger.info("request %s: model %s rejected its inputs: %s",
                        request.state.request_id, job.model, error)
        raise api_error from None


async def _respond(ctx: ServiceContext, request: Request,
                   fields: ImageGenerationRequest | ImageEditRequest,
                   job: GenerationJob, event_prefix: str) -> Any:
    """The response to an image request: its images, or (with `stream`) a stream of events."""
    if fields.stream:
        return await _stream(ctx, request, fields, job, event_prefix)
    result = await _wait(ctx, request, job)
    return await images_response(ctx, fields, job, result, file_url(request),
                                 request.state.request_id)


def partial_steps(total: int, partial_images: int) -> set[int]:
    """The steps whose previews are sent as partial images: evenly spaced, before the last."""
    return {math.ceil(total * (i + 1) / (partial_images + 1))
            for i in range(partial_images)} - {total, 0}


async def _stream(ctx: ServiceContext, request: Request,
                  fields: ImageGenerationRequest | ImageEditRequest, job: GenerationJob,
                  prefix: str) -> Any:
    """OpenAI's image streaming: `<prefix>.partial_image` events (latent previews scaled to
    the output size) at evenly spaced steps, then one `<prefix>.completed` per image; an
    `error` event if it fails. A client that goes away cancels the job."""
    if fields.response_format == "url":
        raise APIError(400, "stream sends images as b64_json; response_format 'url' can't be "
                       "streamed", "response_format", "unsupported_parameter")
    partials = fields.partial_images or 0
    if partials:
        job.wants_preview = lambda step, total: step in partial_steps(total, partials)
    record = JobRecord(job)
    job.listener = record
    # Subscribed before the job can start, so no partial image is missed.
    history, queue = record.subscribe(asyncio.get_running_loop())
    future = submit(ctx, job)  # before the stream opens: a full queue is still a plain 429
    track(ctx, record, future, fields, file_url(request), request.state.request_id)
    output_format = fields.output_format or "png"
    common = {"size": f"{job.width}x{job.height}", "quality": "auto", "background": "opaque",
              "output_format": output_format}

    def encode_partials(images: tuple[Image.Image, ...]) -> list[str]:
        return [b64(encode_image(scaled_preview(image, job.width, job.height), output_format,
                                 fields.output_compression)) for image in images]

    async def events() -> AsyncIterator[bytes]:
        sent_partials = 0
        try:
            async for event in follow(history, queue, idle_seconds=KEEPALIVE_SECONDS):
                if event is None:
                    yield KEEPALIVE
                elif event.type == "progress" and event.previews and sent_partials < partials:
                    for index, data in enumerate(await run_in_threadpool(
                            encode_partials, event.previews)):
                        yield sse_event(f"{prefix}.partial_image", {
                            "type": f"{prefix}.partial_image", "b64_json": data,
                            "created_at": int(time.time()), **common,
                            "partial_image_index": sent_partials, "image_index": index})
                    sent_partials += 1
                elif event.type == "completed":
                    for index, item in enumerate(event.data["result"]["data"]):
                        yield sse_event(f"{prefix}.completed", {
                            "type": f"{prefix}.completed", "b64_json": item["b64_json"],
                            "created_at": int(time.time()), **common, "usage": _NO_USAGE,
                            "image_index": index, "seed": item["seed"]})
                elif event.terminal:  # failed or cancelled
                    yield sse_event("error", {"type": "error", "error": event.data["error"]})
        finally:
            record.unsubscribe(queue)
            if not record.finished:  # the client went away mid-stream
                ctx.engine.cancel(job)

    return sse_response(events())


@router.post(
    "/images/generations",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses=IMAGE_RESPONSES,
    openapi_extra=json_body_doc("ImageGenerationRequest"),
    summary="Create images from a prompt (OpenAI-compatible)",
)
async def create_images(
    request: Request, ctx: ServiceContext = Depends(service_context)  # noqa: B008
) -> Any:
    request.state.workflow = "text2image"
    if content_type(request) != JSON:
        raise unsupported_media(JSON)
    fields = parse_body(ImageGenerationRequest, await read_json(request))
    model = model_for(ctx, request, fields.model)
    job = build_job(fields, model, "text2image")
    return await _respond(ctx, request, fields, job, "image_generation")


async def _edit_inputs(
    request: Request,
) -> tuple[ImageEditRequest, Image.Image, Image.Image | None]:
    """(the fields, the decoded image, the decoded mask) from a multipart or JSON body."""
    kind = content_type(request)
    if kind == JSON:
        fields = parse_body(ImageEditRequest, await read_json(request))
        image = await run_in_threadpool(decode_base64_image, fields.image, "image")
        mask = None
        if fields.mask is not None:
            mask = await run_in_threadpool(decode_base64_image, fields.mask, "mask")
        return fields, image, mask
    if kind != MULTIPART:
        raise unsupported_media(f"{MULTIPART} (files) or {JSON} (base64)")
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
    return parse_body(ImageEditRequest, payload), decoded["image"], decoded.get("mask")


@router.post(
    "/images/edits",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses=IMAGE_RESPONSES,
    openapi_extra=_edit_body_doc(),
    summary="Edit an image: image-to-image, inpainting or image-conditioned generation",
)
async def edit_images(
    request: Request, ctx: ServiceContext = Depends(service_context)  # noqa: B008
) -> Any:
    fields, image, mask = await _edit_inputs(request)
    model = model_for(ctx, request, fields.model)
    workflow = edit_workflow(model, mask is not None)
    request.state.workflow = workflow
    job = await run_in_threadpool(build_job, fields, model, workflow, image, mask)
    return await _respond(ctx, request, fields, job, "image_edit")


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
