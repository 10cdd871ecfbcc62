"""What every way of asking for images shares: submitting a job, naming how it ended, and
turning its result into OpenAI's response body.

Three routes start jobs: a synchronous generation or edit (the client waits on the HTTP
request), a streaming one (`stream: true`, server-sent events) and `/v1/jobs` (the client
polls or follows events). They differ only in how they wait; submission (429 on a full queue),
the meaning of each way a job can end, and the encoding of images are here, once.

Not handled here: parsing and validating requests (`service.validation`), the SSE event
shapes (the routes).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from fastapi.concurrency import run_in_threadpool

from blocks import GenerationCancelled, InvalidInput, Unavailable
from deployments.lora_cache import LoraLoadError
from service.context import ServiceContext
from service.engine import EngineBusy, QueueFull
from service.errors import APIError
from service.image_io import b64, encode_image, media_type
from service.job_store import JobRecord
from service.jobs import GenerationJob, GenerationResult, GenerationTimedOut
from service.openai_options import end_user, prompt_tokens, quality_label, usage
from service.registry import ModelNotReady
from service.schemas import ImageRequestFields

logger = logging.getLogger(__name__)

FileURL = Callable[[str], str]  # file id -> the URL it is served at


def submit(ctx: ServiceContext, job: GenerationJob) -> Future[GenerationResult]:
    """Queue `job` on the engine: 429 when the queue is full, 503 when it is shutting down.
    An exact repeat of a finished job is answered from the result cache instead (a resolved
    future), and a job that succeeds is stored there."""
    job.timeout_seconds = ctx.settings.request_timeout_seconds
    stored = ctx.results.get(job)
    if stored is not None:
        future: Future[GenerationResult] = Future()
        future.set_result(stored)
        return future
    try:
        future = ctx.engine.submit(job)
        if ctx.results.enabled:
            future.add_done_callback(lambda done: _store(ctx, job, done))
        return future
    except QueueFull as error:
        raise APIError(429, f"server busy: {error}; retry after {error.retry_after}s", None,
                       "queue_full", {"Retry-After": str(error.retry_after)}) from None
    except EngineBusy as error:
        raise APIError(503, f"server unavailable: {error}; retry later", None,
                       "server_busy", {"Retry-After": str(error.retry_after)}) from None


def _store(ctx: ServiceContext, job: GenerationJob, done: Future[GenerationResult]) -> None:
    if not done.cancelled() and done.exception() is None:
        ctx.results.put(job, done.result())


def outcome_error(error: BaseException, job: GenerationJob) -> APIError | None:
    """How a job that raised `error` ended, as an API error; None for an unexpected error
    (a bug, or a broken model: the caller logs it and answers a plain 500)."""
    if isinstance(error, GenerationTimedOut):
        limit = f" than {error.seconds:g}s" if error.seconds is not None else ""
        return APIError(504, f"generation took longer{limit} and was cancelled", None,
                        "timeout")
    if isinstance(error, GenerationCancelled):
        return APIError(499, "generation cancelled", None, "cancelled")
    # Queued when the engine stopped, or (Ray mode) a deployment died or is full.
    if isinstance(error, Unavailable):
        return APIError(503, f"server unavailable: {error}; retry later", None,
                        "server_busy", {"Retry-After": str(error.retry_after)})
    if isinstance(error, ModelNotReady):
        return APIError(503, str(error), "model", "model_unavailable")
    if isinstance(error, LoraLoadError):  # the server's adapter file, not the request
        return APIError(500, str(error), "loras", "lora_unavailable")
    if isinstance(error, InvalidInput):
        # Blocks reject values they can't use naming the block, the input and what is allowed
        # (e.g. a reference image too small): the client's input, so a 400. Any other error
        # (a ValueError from a miswired block included) is a bug: a 500.
        return APIError(400, f"model '{job.model}' rejected the request: {error}", error.param,
                        "invalid_input")
    return None


async def images_response(ctx: ServiceContext, fields: ImageRequestFields, job: GenerationJob,
                          result: GenerationResult, file_url: FileURL,
                          request_id: str) -> dict[str, Any]:
    """OpenAI's images response for `result` (encoding runs off the event loop)."""
    output_format = fields.output_format or "png"

    def encode() -> tuple[list[bytes], int]:
        encoded = [encode_image(image, output_format, fields.output_compression)
                   for image in result.images]
        try:
            pipeline = ctx.registry.get(job.model).base
        except Exception:  # unloaded meanwhile: count words instead
            pipeline = None
        return encoded, prompt_tokens(pipeline, job.prompt)

    encoded, text_tokens = await run_in_threadpool(encode)
    data = []
    for blob, seed in zip(encoded, result.seeds, strict=True):
        if (fields.response_format or "b64_json") == "url":
            file_id = ctx.files.put(blob, media_type(output_format))
            data.append({"url": file_url(file_id), "seed": seed})
        else:
            data.append({"b64_json": b64(blob), "seed": seed})
    ctx.metrics.images_generated.labels(job.model).inc(len(result.images))
    logger.info("request %s: %s %s n=%d %dx%d steps=%d seed=%d in %.2fs (steps shared by up to "
                "%d requests, user %s)", request_id, job.model, job.workflow, job.n, job.width,
                job.height, job.steps, job.seed, result.seconds, result.batch_size,
                end_user(fields) or "-")
    response = {"created": int(time.time()), "data": data, "model": job.model,
                "size": f"{job.width}x{job.height}", "output_format": output_format,
                "quality": quality_label(fields.quality), "background": "opaque",
                "usage": usage(text_tokens, job.input_images, len(result.images))}
    if fields.safety_identifier:
        response["safety_identifier"] = fields.safety_identifier
    return response


def track(ctx: ServiceContext, record: JobRecord, future: Future[GenerationResult],
          fields: ImageRequestFields, file_url: FileURL, request_id: str) -> None:
    """Write the job's outcome into `record` when its future resolves (a background task on
    this loop, so a job finishes whether or not anyone is listening)."""

    async def finish() -> None:
        job = record.job
        try:
            result = await asyncio.wrap_future(future)
            record.succeed(await images_response(ctx, fields, job, result, file_url,
                                                 request_id))
        except Exception as error:
            api_error = outcome_error(error, job)
            if api_error is None:
                logger.error("request %s: job %s failed", request_id, job.id,
                             exc_info=(type(error), error, error.__traceback__))
                api_error = APIError(500, f"internal server error; job id {job.id}", None,
                                     "internal_error")
            if api_error.code == "cancelled":
                record.mark_cancelled(api_error.body()["error"])
            else:
                record.fail(api_error.body()["error"])

    task = asyncio.get_running_loop().create_task(finish())
    ctx.background.add(task)  # held until done: the loop keeps only weak references
    task.add_done_callback(ctx.background.discard)
