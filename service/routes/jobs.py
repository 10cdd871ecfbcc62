"""Background jobs: `POST /v1/jobs`, `GET /v1/jobs/{id}`, `GET /v1/jobs/{id}/events` (server-
sent events) and `DELETE /v1/jobs/{id}` (cancel).

A job takes a generation's body (plus `preview`) and runs like one, but nobody has to wait on
the request: its state, step, ETA and, once done, result or error are read by id, or followed
as events, in order:

    queued     {"position": jobs ahead}
    started    {}
    progress   {"step", "total_steps", "previews": [base64 PNG, one per image]}   (previews
               only with `preview: true`: low resolution, from the latents, not decoded)
    completed  {"result": the images response}        \
    failed     {"error": OpenAI's error object}        } exactly one, last
    cancelled  {"error": ...}                         /

Each event has an `id:` (1, 2, ...); a reconnecting client that sends `Last-Event-ID` gets only
newer ones. Only the newest progress event is kept for late subscribers. A DELETE stops a queued
job at once and a running one at its next step, without touching its batch-mates; it answers
the job's status (a finished job is left as it was). Finished jobs are kept for
BLOCKSERVE_JOB_TTL_SECONDS and BLOCKSERVE_MAX_FINISHED_JOBS at most, then 404.

Not handled here: edits as jobs (an input image makes a body too large to keep around).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool

from service.auth import require_api_key
from service.context import ServiceContext, service_context
from service.errors import APIError
from service.generation import outcome_error, submit, track
from service.image_io import b64, encode_image
from service.job_store import QUEUED, JobEvent, JobRecord, follow
from service.routes.request_bodies import (
    ERROR_RESPONSES,
    JSON,
    content_type,
    file_url,
    json_body_doc,
    model_for,
    parse_body,
    public_url,
    read_json,
    unsupported_media,
)
from service.schemas import JobRequest, JobStatus
from service.sse import (
    KEEPALIVE,
    KEEPALIVE_SECONDS,
    MEDIA_TYPE,
    event_schema,
    sse_event,
    sse_response,
)
from service.validation import build_job

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["jobs"])
_MAX_EVENT_ID_DIGITS = 18

JOB_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES, 404: {**ERROR_RESPONSES[404], "description": "No such job (or it was "
                                                                    "forgotten)."},
}


def _record(ctx: ServiceContext, job_id: str) -> JobRecord:
    record = ctx.jobs.get(job_id)
    if record is None:
        raise APIError(404, f"job '{job_id}' does not exist or was forgotten (finished jobs "
                       f"are kept {ctx.settings.job_ttl_seconds:g}s)", "job_id", "job_not_found")
    return record


def _status(ctx: ServiceContext, record: JobRecord) -> dict[str, Any]:
    position = getattr(ctx.engine, "position", None)
    return record.status(position(record.job) if position is not None else None)


@router.post(
    "/jobs",
    status_code=202,
    response_model=JobStatus,
    response_model_exclude_none=True,
    responses=JOB_RESPONSES,
    openapi_extra=json_body_doc("JobRequest"),
    summary="Start generating images in the background; follow it by id",
)
async def create_job(
    request: Request, response: Response,
    ctx: ServiceContext = Depends(service_context),  # noqa: B008
) -> Any:
    request.state.workflow = "text2image"
    if content_type(request) != JSON:
        raise unsupported_media(JSON)
    fields = parse_body(JobRequest, await read_json(request))
    model = model_for(ctx, request, fields.model)
    job = build_job(fields, model, "text2image")
    if fields.preview:
        job.wants_preview = lambda _step, _total: True
    record = JobRecord(job)
    job.listener = record
    future = submit(ctx, job)
    ctx.jobs.add(record)
    track(ctx, record, future, fields, file_url(request), request.state.request_id)
    response.headers["Location"] = public_url(request, "get_job", job_id=job.id)
    return _status(ctx, record)


@router.get("/jobs/{job_id}", name="get_job", response_model=JobStatus,
            response_model_exclude_none=True, responses=JOB_RESPONSES,
            summary="A job's state, progress, ETA, and its result or error once finished")
async def get_job(
    job_id: str, ctx: ServiceContext = Depends(service_context)  # noqa: B008
) -> Any:
    return _status(ctx, _record(ctx, job_id))


@router.delete("/jobs/{job_id}", response_model=JobStatus, response_model_exclude_none=True,
               responses=JOB_RESPONSES,
               summary="Cancel a job: queued ones at once, running ones at their next step")
async def cancel_job(
    job_id: str, ctx: ServiceContext = Depends(service_context)  # noqa: B008
) -> Any:
    record = _record(ctx, job_id)
    if not record.finished:
        ctx.engine.cancel(record.job)
        if record.state == QUEUED:  # it never started: cancelled now, not at a next step
            error = outcome_error(record.job.stop_error(), record.job)
            assert error is not None
            record.mark_cancelled(error.body()["error"])
    return _status(ctx, record)


def parse_last_event_id(header: str | None) -> int:
    """The `Last-Event-ID` a reconnecting client sends: one of our event ids (1, 2, ...)."""
    if header is None or not header.strip():
        return 0
    text = header.strip()
    # isascii: "²".isdigit() is true but int("²") fails; the length keeps int() cheap.
    if not (text.isascii() and text.isdigit() and len(text) <= _MAX_EVENT_ID_DIGITS):
        raise APIError(400, f"Last-Event-ID must be an event id this job sent (a whole number "
                       f"of at most {_MAX_EVENT_ID_DIGITS} digits)", "Last-Event-ID",
                       "invalid_header")
    return int(text)


def _render(event: JobEvent) -> bytes:
    data = event.data
    if event.previews:
        data = {**data, "previews": [b64(encode_image(image, "png")) for image in event.previews]}
    return sse_event(event.type, data, event.seq)


@router.get(
    "/jobs/{job_id}/events",
    responses={**JOB_RESPONSES, 200: {
        "description": "Server-sent events, ending with completed, failed or cancelled.",
        "content": {MEDIA_TYPE: {"schema": event_schema([
            "queued", "started", "progress", "completed", "failed", "cancelled"])}}}},
    summary="Follow a job as server-sent events",
)
async def job_events(
    job_id: str, request: Request, ctx: ServiceContext = Depends(service_context)  # noqa: B008
) -> Any:
    record = _record(ctx, job_id)
    after = parse_last_event_id(request.headers.get("last-event-id"))

    async def events() -> AsyncIterator[bytes]:
        history, queue = record.subscribe(asyncio.get_running_loop())
        try:
            async for event in follow(history, queue, after, KEEPALIVE_SECONDS):
                yield KEEPALIVE if event is None else await run_in_threadpool(_render, event)
        finally:
            record.unsubscribe(queue)  # the job runs on: it isn't tied to this connection

    return sse_response(events())
