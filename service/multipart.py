"""Parsing multipart bodies so that an image part is read as bytes, filename or not.

Starlette reads a part without a `filename` as text, decoded with the body's charset, which
mangles an image some clients send without one. Here such a part whose own `Content-Type` is
not `text/*` comes back as its raw `bytes`; parts with a filename are `UploadFile`s and plain
fields are `str`, as Starlette gives them.

Not handled here: what the parts mean (`service.image_inputs`), body size limits (the
middleware, and `max_part_size`).
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from service.errors import APIError


def _binary_part(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"content-type":
            kind = value.split(b";")[0].strip().lower()
            return bool(kind) and not kind.startswith(b"text/")
    return False


class _BinaryAwareParser(MultiPartParser):
    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None and _binary_part(part.item_headers):
            self.items.append((part.field_name, bytes(part.data)))  # type: ignore[arg-type]
            return
        super().on_part_end()


async def read_multipart(request: Request, max_files: int, max_fields: int,
                         max_part_size: int) -> list[tuple[str, Any]]:
    """The body's parts in order: (name, `UploadFile` | bytes | str); 400 when malformed."""
    parser = _BinaryAwareParser(request.headers, request.stream(), max_files=max_files,
                                max_fields=max_fields, max_part_size=max_part_size)
    try:
        form = await parser.parse()
    except (APIError, ClientDisconnect):  # a client gone mid-upload is not a malformed body
        raise
    except MultiPartException as error:
        raise APIError(400, f"malformed multipart body: {error.message}", None,
                       "invalid_multipart") from None
    except Exception as error:  # python-multipart's own errors: a malformed body
        raise APIError(400, f"malformed multipart body: {error}", None,
                       "invalid_multipart") from None
    return list(form.multi_items())
