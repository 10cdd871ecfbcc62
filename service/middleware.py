"""The ASGI layer around every request: request ids, body size, unexpected errors, metrics.

One pure-ASGI middleware, outermost in the app, so it sees every request and every response:

- gives each request an id (a sane incoming `x-request-id`, else a new one), returns it in the
  `x-request-id` header and logs with it;
- refuses a body larger than `max_body_bytes` with 413: from `Content-Length` before anything
  is read, and while streaming for chunked bodies;
- turns any exception a route did not expect into a logged (with traceback and request id)
  plain 500 in the OpenAI error shape that leaks nothing;
- records `blockserve_requests_total` / `..._request_duration_seconds` for the images routes,
  with the model and workflow the route put into `request.state` (else "unknown").
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

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


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class ServiceMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int, metrics: ServiceMetrics) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

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
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            early = self._check_length(scope)
            if early is not None:
                await self._send_error(send_with_id, early)
            else:
                await self.app(scope, self._limited(receive), send_with_id)
        except APIError as error:  # a body-size error raised outside the app's handlers
            if not started:
                await self._send_error(send_with_id, error)
        except Exception:
            logger.exception("request %s %s %s failed", request_id, scope.get("method"),
                             scope.get("path"))
            if not started:
                await self._send_error(send_with_id, APIError(
                    500, f"internal server error; request id {request_id}", None,
                    "internal_error"))
        finally:
            if scope.get("path", "").startswith(METERED_PREFIX):
                self.metrics.observe_request(
                    state.get("model", "unknown"), state.get("workflow", "unknown"), status,
                    time.perf_counter() - start,
                )

    def _too_large(self) -> APIError:
        return APIError(413, f"request body exceeds {self.max_body_bytes} bytes", None,
                        "payload_too_large")

    def _check_length(self, scope: Scope) -> APIError | None:
        length = _header(scope, b"content-length")
        if length is None:
            return None
        if not length.strip().isdigit():
            return APIError(400, "Content-Length must be a non-negative integer", None,
                            "invalid_header")
        if int(length) > self.max_body_bytes:
            return self._too_large()
        return None

    def _limited(self, receive: Receive) -> Receive:
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise self._too_large()
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
