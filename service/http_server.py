"""Embedded mode's HTTP server: uvicorn, with limits on slow and idle clients.

uvicorn closes an idle keep-alive connection after `timeout_keep_alive`, but a client that
opens a connection and sends nothing, or sends its request line and headers a byte at a time,
holds it for ever; enough such clients use up every file descriptor. `read_timeout_protocol`
adds a deadline: a connection's request headers must arrive within `read_timeout_seconds` of
the connection opening (or of the previous response), else it is closed. The body has its
own deadline, enforced by the app (`service.middleware`: 408), so it applies in Ray mode too.
The same deadline bounds what a client may send before its headers end: more than
`MAX_HEADER_BYTES` gets 431 and the connection closed (httptools has no limit of its own, so
one request could otherwise grow a header to gigabytes within the deadline).
`max_connections` is uvicorn's `limit_concurrency`: past it, new requests get 503.

Not handled here: Ray mode, whose HTTP server is Ray Serve's proxy (its own keep-alive
timeout; put a reverse proxy with header timeouts in front of it), and TLS.
"""

from __future__ import annotations

import asyncio
from typing import Any

from service.settings import Settings

MAX_HEADER_BYTES = 64 * 1024
_HEADERS_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s")
_HEADERS_TOO_LARGE_BODY = (
    b'{"error":{"message":"request line and headers exceed %d bytes","type":'
    b'"invalid_request_error","param":null,"code":"headers_too_large"}}' % MAX_HEADER_BYTES)


def _base_protocol() -> type[asyncio.Protocol]:
    """The protocol class uvicorn's "auto" would pick: httptools if installed, else h11."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return H11Protocol


def read_timeout_protocol(read_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class, closing connections whose request headers don't arrive
    within `read_timeout_s` (from the connection opening, or from the previous response)."""
    base: Any = _base_protocol()

    class ReadTimeoutProtocol(base):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self._arm_header_deadline()

        def data_received(self, data: bytes) -> None:
            waiting = self._header_deadline is not None and self.cycle is self._cycle_at_arm
            super().data_received(data)
            if not waiting or self.transport.is_closing():
                return
            if self.cycle is not self._cycle_at_arm:  # the headers ended in this chunk
                self._header_bytes = 0
                return
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES:
                self.transport.write(_HEADERS_TOO_LARGE % (len(_HEADERS_TOO_LARGE_BODY),
                                                           _HEADERS_TOO_LARGE_BODY))
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_deadline()
            super().connection_lost(exc)

        def _arm_header_deadline(self) -> None:
            self._cancel_header_deadline()
            # uvicorn makes a new cycle when a request's headers are complete: the same
            # cycle at the deadline means no new request arrived in time.
            self._cycle_at_arm = self.cycle
            self._header_bytes = 0
            self._header_deadline = self.loop.call_later(read_timeout_s, self._headers_late)

        def _cancel_header_deadline(self) -> None:
            deadline = getattr(self, "_header_deadline", None)
            if deadline is not None:
                deadline.cancel()
                self._header_deadline = None

        def _headers_late(self) -> None:
            self._header_deadline = None
            busy = self.cycle is not None and not self.cycle.response_complete
            if self.cycle is self._cycle_at_arm and not busy and not self.transport.is_closing():
                self.transport.close()

    ReadTimeoutProtocol.__name__ = f"ReadTimeout{base.__name__}"
    return ReadTimeoutProtocol


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for `uvicorn.run` / `uvicorn.Config` serving embedded mode."""
    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "http": read_timeout_protocol(settings.read_timeout_seconds),
        "timeout_keep_alive": settings.keep_alive_seconds,
        "limit_concurrency": settings.max_connections,
    }
