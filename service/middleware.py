"""The ASGI layer around every request: request ids, body size and pace, unexpected errors,
client aborts, metrics.

One pure-ASGI middleware, outermost in the app, so it sees every request and every response:

- gives each request an id (a sane incoming `x-request-id`, else a new one), returns it in the
  `x-request-id` header (unless `echo_request_id` is off: Ray Serve's proxy adds that header
  itself, from the same incoming id) and logs with it;
- refuses a body larger than `max_body_bytes` with 413: from `Content-Length` before anything
  is read, and while streaming for chunked bodies; a body that has not fully arrived
  `read_timeout_s` after the request started gets 408 and the connection is closed;
- a client that goes away before its response starts (mid-upload, say) is a client abort:
  counted as 499 and logged in one line, not a server error, however the news arrives: an
  `http.disconnect`, a `receive` that fails, or the request's task cancelled (Ray Serve's
  proxy does the last two when its client leaves);
- turns any exception a route did not expect into a logged (with traceback and request id)
  plain 500 in the OpenAI error shape that leaks nothing;
- records `blockserve_requests_total` / `..._request_duration_seconds` for the generation
  routes (images, and creating a job), with the model and workflow the route put into
  `request.state` (else "unknown"), and `blockserve_http_requests_total` for every request.

Not handled here: how long a client may take to send its headers, and how many connections
are open (the HTTP server's job: `service.http_server`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.requests import ClientDisconnect

from service.errors import APIError, error_body
from service.metrics import ServiceMetrics

logger = logging.getLogger("blockserve.requests")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
METERED_PREFIX = "/v1/images/"
CLIENT_CLOSED = 499  # nginx's "client closed request": the client left before the response


def is_generation(method: str, path: str) -> bool:
    """The requests `blockserve_requests_total` counts: those that ask for images."""
    return path.startswith(METERED_PREFIX) or (method == "POST" and path == "/v1/jobs")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class ServiceMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int, metrics: ServiceMetrics,
                 read_timeout_s: float = 30.0, echo_request_id: bool = True) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.read_timeout_s = read_timeout_s
        self.echo_request_id = echo_request_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        incoming = _header(scope, b"x-request-id")
        request_id = incoming if incoming and _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"x-request-id"]
                if self.echo_request_id:
                    headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            early = self._check_length(scope)
            if early is not None:
                await self._send_error(send_with_id, early)
            else:
                await self.app(scope, self._limited(receive, start, request_id), send_with_id)
        except APIError as error:  # a body-size error raised outside the app's handlers
            if not started:
                await self._send_error(send_with_id, error)
        except ClientDisconnect:
            # The client left before sending its whole body: its abort, not our failure.
            logger.info("request %s %s %s: the client disconnected before its body arrived",
                        request_id, scope.get("method"), scope.get("path"))
            if not started:
                status = CLIENT_CLOSED
        except asyncio.CancelledError:
            # Behind Ray Serve the proxy, not the client, sees the connection drop: it cancels
            # the replica's task, so a client that leaves mid-upload (or while it waits)
            # arrives here as a cancellation rather than an `http.disconnect`. Still its abort.
            logger.info("request %s %s %s: cancelled (the client went away)", request_id,
                        scope.get("method"), scope.get("path"))
            if not started:
                status = CLIENT_CLOSED
            raise
        except Exception:
            logger.exception("request %s %s %s failed", request_id, scope.get("method"),
                             scope.get("path"))
            if not started:
                await self._send_error(send_with_id, APIError(
                    500, f"internal server error; request id {request_id}", None,
                    "internal_error"))
        finally:
            method, path = scope.get("method", ""), scope.get("path", "")
            seconds = time.perf_counter() - start
            if is_generation(method, path):
                self.metrics.observe_request(
                    state.get("model", "unknown"), state.get("workflow", "unknown"), status,
                    seconds)
            route = scope.get("route")
            self.metrics.observe_http(getattr(route, "path", None), method, status)

    def _too_large(self) -> APIError:
        return APIError(413, f"request body exceeds {self.max_body_bytes} bytes", None,
                        "payload_too_large")

    def _check_length(self, scope: Scope) -> APIError | None:
        length = _header(scope, b"content-length")
        if length is None:
            return None
        length = length.strip()
        # isascii: "²".isdigit() is true but int("²") fails; the length keeps int() cheap.
        if not (length.isascii() and length.isdigit() and len(length) <= 19):
            return APIError(400, "Content-Length must be a non-negative integer", "Content-Length",
                            "invalid_header")
        if int(length) > self.max_body_bytes:
            return self._too_large()
        return None

    def _limited(self, receive: Receive, start: float, request_id: str) -> Receive:
        """`receive` with the body-size cap, and a deadline for the body to arrive by.

        A `receive` that fails is a connection gone: behind Ray Serve, `receive` calls back
        into Serve's proxy, and once the client has left that call can fail (Ray's
        `TaskCancelledError`) instead of returning the `http.disconnect` uvicorn would give.
        From then on it reads as `http.disconnect`, so a client leaving mid-upload is a 499
        whichever way the news arrives, never an unexpected error."""
        received = 0
        body_done = False
        gone = False
        deadline = start + self.read_timeout_s

        async def from_client() -> Message:
            nonlocal gone
            if not gone:
                try:
                    return await receive()
                except Exception as error:
                    logger.info("request %s: receiving from the client failed (%s): the "
                                "connection is gone", request_id, type(error).__name__)
                    gone = True
            return {"type": "http.disconnect"}

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # after the body, receive only waits for a disconnect: no deadline
                return await from_client()
            try:
                message = await asyncio.wait_for(from_client(),
                                                 max(deadline - time.perf_counter(), 0.0))
            except asyncio.TimeoutError:
                raise APIError(408, f"request body not received within "
                               f"{self.read_timeout_s:g}s", None, "request_timeout",
                               {"Connection": "close"}) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise self._too_large()
                body_done = not message.get("more_body", False)
            else:
                body_done = True
            return message

        return limited_receive

    @staticmethod
    async def _send_error(send: Send, error: APIError) -> None:
        body = json.dumps(error_body(error.status, error.message, error.param,
                                     error.code)).encode()
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
