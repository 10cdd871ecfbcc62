"""A request's input images and its other fields, from a multipart or a JSON body.

Edits and variations take images three ways:

- multipart files: `image` (or OpenAI's `image[]`, repeated for several) and `mask`; a part
  without a filename is read by its Content-Type (`service.multipart`);
- JSON base64 strings (`"image": "<base64 or data: URL>"`, blockserve's original form);
- OpenAI's JSON references: `"images": [{"image_url": "data:..."} | {"file_id": "..."}]` and
  `"mask": {...}`. A `file_id` is an image this server returned as a url (`/v1/files/{id}`);
  remote URLs are never fetched.

Every decoding failure is a 400 naming the field. How many images a model takes is
`service.validation`'s business.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from PIL import Image
from starlette.datastructures import UploadFile

from service.context import ServiceContext
from service.errors import APIError
from service.image_io import Decoding, decode_base64_image, decode_image
from service.multipart import read_multipart
from service.schemas import MAX_INPUT_IMAGES, ImageReference

MAX_FIELDS = 64
_NESTED = re.compile(r"^([^\[\]]+)\[([^\[\]]+)\]$")


@dataclass
class InputImages:
    """What a body carried: its non-file fields, and the decoded images."""

    payload: dict[str, Any]
    images: list[Image.Image] = field(default_factory=list)
    mask: Image.Image | None = None


def _decode_reference(ctx: ServiceContext, reference: ImageReference,
                      param: str, decoding: Decoding | None = None) -> Image.Image:
    if reference.file_id is not None:
        stored = ctx.files.get(reference.file_id)
        if stored is None:
            raise APIError(400, f"'{param}': file '{reference.file_id}' does not exist or has "
                           f"expired (files last {ctx.settings.file_ttl_seconds:g}s)", param,
                           "file_not_found")
        return decode_image(stored.data, param, decoding)
    assert reference.image_url is not None
    if not reference.image_url.strip().lower().startswith("data:"):
        raise APIError(400, f"'{param}': remote image URLs are not fetched; send a "
                       "data:image/...;base64, URL or a file_id", param, "unsupported_url")
    return decode_base64_image(reference.image_url, param, decoding)


def _decode_json_image(ctx: ServiceContext, value: str | ImageReference, param: str,
                       decoding: Decoding | None = None) -> Image.Image:
    if isinstance(value, ImageReference):
        return _decode_reference(ctx, value, param, decoding)
    return decode_base64_image(value, param, decoding)


async def json_images(ctx: ServiceContext, fields: Any,
                      decoding: Decoding | None = None) -> InputImages:
    """The images of a parsed JSON edit body (`ImageEditRequest`), each decode reserved in
    `decoding` (`image_io.decoding_session`)."""
    if fields.image is not None and fields.images is not None:
        raise APIError(400, "send the input as 'image' or as 'images', not both", "images",
                       "invalid_value")
    if fields.image is None and fields.images is None:
        raise APIError(400, "missing required parameter 'image' (or 'images')", "image",
                       "missing_required_parameter")
    images = []
    if fields.image is not None:
        images.append(await run_in_threadpool(decode_base64_image, fields.image, "image",
                                              decoding))
    for index, reference in enumerate(fields.images or []):
        images.append(await run_in_threadpool(_decode_reference, ctx, reference,
                                              f"images[{index}]", decoding))
    mask = None
    if fields.mask is not None:
        mask = await run_in_threadpool(_decode_json_image, ctx, fields.mask, "mask", decoding)
    return InputImages({}, images, mask)


async def form_images(request: Request, files: tuple[str, ...],
                      decoding: Decoding | None = None) -> InputImages:
    """A multipart body's fields and its decoded image files. `files` names the file fields
    it may have, among `image` (repeated for several images) and `mask` (once); each decode
    is reserved in `decoding` (`image_io.decoding_session`)."""
    max_bytes = request.app.state.service.settings.max_body_bytes
    parts = await read_multipart(request, max_files=MAX_INPUT_IMAGES + 1,
                                 max_fields=MAX_FIELDS, max_part_size=max_bytes)
    payload: dict[str, Any] = {}
    found: dict[str, list[Any]] = {}
    for key, value in parts:
        name = key[:-2] if key.endswith("[]") else key  # OpenAI's client sends image[] lists
        nested = _NESTED.match(name)
        if isinstance(value, (UploadFile, bytes)) or name in files:
            found.setdefault(name, []).append(value)
        elif nested is not None and isinstance(payload.get(nested[1], {}), dict):
            # OpenAI's client flattens an object field as `svg[model]=...`: rebuild it.
            payload.setdefault(nested[1], {})[nested[2]] = value
        else:
            payload[name] = value
    result = InputImages(payload)
    for name, values in found.items():
        if name not in files:
            raise APIError(400, f"unexpected file field '{name}'; files: {', '.join(files)}",
                           name, "unknown_parameter")
        if name != "image" and len(values) != 1:
            raise APIError(400, f"send exactly one '{name}', got {len(values)}", name,
                           "invalid_value")
        if len(values) > MAX_INPUT_IMAGES:
            raise APIError(400, f"at most {MAX_INPUT_IMAGES} images; got {len(values)}", name,
                           "too_many_images")
        for value in values:
            if isinstance(value, UploadFile):
                decoded = await run_in_threadpool(decode_image, await value.read(), name,
                                                  decoding)
            elif isinstance(value, bytes):
                decoded = await run_in_threadpool(decode_image, value, name, decoding)
            else:  # a text field: base64, as in JSON bodies
                decoded = await run_in_threadpool(decode_base64_image, value, name, decoding)
            if name == "mask":
                result.mask = decoded
            else:
                result.images.append(decoded)
        payload[name] = "(file)"
    if not result.images:
        raise APIError(400, "missing required parameter 'image' (a file)", "image",
                       "missing_required_parameter")
    return result
