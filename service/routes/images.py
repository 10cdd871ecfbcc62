"""`POST /v1/images/generations`, `/v1/images/edits`, `/v1/images/variations` and
`GET /v1/files/{id}`.

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

from service.auth import require_api_key
from service.context import ServiceContext, service_context
from service.errors import APIError
from service.generation import images_response, outcome_error, submit, track
from service.image_inputs import InputImages, form_images, json_images
from service.image_io import Decoding, b64, decoding_session, encode_image
from service.job_store import JobRecord, follow
from service.jobs import TIMEOUT, GenerationJob, GenerationResult
from service.openai_options import quality_label
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
from service.schemas import (
    ImageEditRequest,
    ImageGenerationRequest,
    ImagesResponse,
    ImageVariationRequest,
)
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
    common = {"size": f"{job.width}x{job.height}", "quality": quality_label(fields.quality),
              "background": "opaque", "output_format": output_format}

    def encode_partials(images: tuple[Image.Image, ...]) -> list[str]:
        return [b64(encode_image(scaled_preview(image, job.width, job.height), output_format,
                                 fields.output_compression)) for image in images]

    async def events() -> AsyncIterator[bytes]:
        # `partial_image_index` counts every partial image of the stream, so each one has its
        # own (OpenAI's clients key partials by it); `image_index` says whose it is.
        sent_rounds = sent_images = 0
        try:
            async for event in follow(history, queue, idle_seconds=KEEPALIVE_SECONDS):
                if event is None:
                    yield KEEPALIVE
                elif event.type == "progress" and event.previews and sent_rounds < partials:
                    for index, data in enumerate(await run_in_threadpool(
                            encode_partials, event.previews)):
                        yield sse_event(f"{prefix}.partial_image", {
                            "type": f"{prefix}.partial_image", "b64_json": data,
                            "created_at": int(time.time()), **common,
                            "partial_image_index": sent_images, "image_index": index})
                        sent_images += 1
                    sent_rounds += 1
                elif event.type == "completed":
                    result = event.data["result"]
                    for index, item in enumerate(result["data"]):
                        yield sse_event(f"{prefix}.completed", {
                            "type": f"{prefix}.completed", "b64_json": item["b64_json"],
                            "created_at": int(time.time()), **common,
                            "usage": result["usage"], "image_index": index,
                            "seed": item["seed"],
                            **({"safety_identifier": result["safety_identifier"]}
                               if result.get("safety_identifier") else {})})
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


async def _edit_inputs(ctx: ServiceContext, request: Request,
                       decoding: Decoding) -> tuple[ImageEditRequest, InputImages]:
    """The fields and the decoded input images of a multipart or JSON edit body."""
    kind = content_type(request)
    if kind == JSON:
        fields = parse_body(ImageEditRequest, await read_json(request))
        return fields, await json_images(ctx, fields, decoding)
    if kind != MULTIPART:
        raise unsupported_media(f"{MULTIPART} (files) or {JSON} (base64 or image references)")
    inputs = await form_images(request, ("image", "mask"), decoding)
    fields = parse_body(ImageEditRequest, {**inputs.payload, "image": "(file)"})
    return fields, inputs


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
    # The full-size images live only inside this block: the job holds them resized.
    with decoding_session(ctx.decodes) as decoding:
        fields, inputs = await _edit_inputs(ctx, request, decoding)
        model = model_for(ctx, request, fields.model)
        workflow = edit_workflow(model, inputs.mask is not None)
        request.state.workflow = workflow
        job = await run_in_threadpool(build_job, fields, model, workflow, inputs.images,
                                      inputs.mask)
        del inputs
    return await _respond(ctx, request, fields, job, "image_edit")


@router.post(
    "/images/variations",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses=ERROR_RESPONSES,
    openapi_extra={"requestBody": {"required": True, "content": {
        MULTIPART: {"schema": {"$ref": "#/components/schemas/ImageVariationForm"}}}}},
    summary="Variations of an image (models with an image-to-image or image-conditioned "
            "workflow)",
)
async def create_variations(
    request: Request, ctx: ServiceContext = Depends(service_context)  # noqa: B008
) -> Any:
    if content_type(request) != MULTIPART:
        raise unsupported_media(f"{MULTIPART} (OpenAI's form, with the image as a file)")
    with decoding_session(ctx.decodes) as decoding:  # as in edit_images
        inputs = await form_images(request, ("image",), decoding)
        fields = parse_body(ImageVariationRequest, {**inputs.payload, "image": "(file)"})
        model = model_for(ctx, request, fields.model)
        workflow = edit_workflow(model, has_mask=False)
        request.state.workflow = workflow
        job = await run_in_threadpool(build_job, fields, model, workflow, inputs.images)
        del inputs
    result = await _wait(ctx, request, job)
    return await images_response(ctx, fields, job, result, file_url(request),
                                 request.state.request_id)


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
