"""Server-sent events: the wire format, and a streaming response that proxies don't buffer.

Not handled here: what the events are (`service.routes.jobs`, `service.routes.images`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

MEDIA_TYPE = "text/event-stream"
KEEPALIVE = b": keepalive\n\n"  # a comment line: keeps idle connections (and proxies) open
KEEPALIVE_SECONDS = 15.0


def event_schema(names: list[str]) -> dict[str, Any]:
    """OpenAPI (< 3.2) schema of one event of a `text/event-stream` response."""
    return {"type": "object", "required": ["event", "data"], "properties": {
        "event": {"type": "string", "enum": names},
        "id": {"type": "string", "description": "1, 2, ...: send as Last-Event-ID to resume."},
        "data": {"type": "string", "description": "A JSON object; its `type` is the event's "
                 "name."},
    }}


def sse_event(event: str, data: dict[str, Any], event_id: int | None = None) -> bytes:
    """One event: `event:` names it (OpenAI's clients read `data`'s `type` too)."""
    lines = [f"event: {event}"]
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.append("data: " + json.dumps(data, separators=(",", ":")))
    return ("\n".join(lines) + "\n\n").encode()


def sse_response(events: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(events, media_type=MEDIA_TYPE, headers={
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",  # nginx: pass each event on at once
    })
