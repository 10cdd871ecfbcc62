"""Images across the HTTP boundary: decoding uploads and base64, masks, encoding outputs.

Every decoding failure is an `APIError` (400) naming the field, never a PIL traceback.
Masks follow OpenAI's convention: where the mask is transparent, the image is edited. A mask
without alpha is read as grayscale, white = edit (diffusers' convention). The result handed to
pipelines is always an "L" image, white = repaint.

Decoding is bounded, because a small file can decode into a huge image: only PNG, JPEG and
WebP are opened; each side (at most `MAX_INPUT_SIDE`), the pixel count and the aspect ratio
are checked from the header before any pixel is decoded; and a `DecodeGate` caps how many
images decode at once, and how many estimated bytes of decoded images are held (429 past
it). Memory freed after a large decode is handed back to the system (`release_freed_memory`).

Not handled here: resizing policy beyond "make it the requested size", colour management,
animated images (the first frame is used; the others are never decoded).
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import ctypes.util
import io
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import Image, UnidentifiedImageError

from service.errors import APIError

MAX_INPUT_SIDE = 4096
MAX_INPUT_PIXELS = 4096 * 4096
MAX_ASPECT_RATIO = 16  # longer side / shorter side
INPUT_FORMATS = ("PNG", "JPEG", "WEBP")
OUTPUT_FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg"),
                  "webp": ("WEBP", "image/webp")}
_DATA_URL = re.compile(r"^data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)
# Bytes per pixel PIL stores for a mode (multi-band 8-bit modes take 4), and how many copies
# of the full-size image an edit holds at once (decoded, converted to RGB, the mask's).
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
_COPIES = 3
# Decodes that took more than this hand their memory back to the system when done.
_TRIM_AFTER_BYTES = 32 * 2**20


def decode_bytes_estimate(image: Image.Image) -> int:
    """About how much memory decoding (and converting) `image` takes, from its header."""
    width, height = image.size
    return width * height * _BYTES_PER_PIXEL.get(image.mode, 4) * _COPIES


class DecodeGate:
    """At most `max_decodes` images decoding at once, and `max_bytes` estimated bytes of
    decoded images held at once.

    A decode takes a slot while it runs (`reserve`, then `decoded`); its bytes stay reserved
    while the decoded image is alive at full size (until the request has made its job from
    it: `release`). Full: wait up to `wait_s`, then 429 with Retry-After. Thread-safe:
    decoding runs on the threadpool.
    """

    def __init__(self, max_decodes: int, max_bytes: int, wait_s: float = 1.0) -> None:
        self.max_decodes = max_decodes
        self.max_bytes = max_bytes
        self.wait_s = wait_s
        self._cond = threading.Condition()
        self._decodes = 0
        self._bytes = 0

    @property
    def in_use(self) -> tuple[int, int]:
        """(decodes running, bytes reserved) now."""
        with self._cond:
            return self._decodes, self._bytes

    def reserve(self, nbytes: int, param: str) -> None:
        """A decode slot and `nbytes`; 429 when they can't be had within `wait_s`."""
        if nbytes > self.max_bytes:
            raise APIError(400, f"'{param}' would take about {nbytes // 2**20} MiB to decode; "
                           f"at most {self.max_bytes // 2**20} MiB are accepted", param,
                           "image_too_large")
        with self._cond:
            fits = self._cond.wait_for(
                lambda: self._decodes < self.max_decodes
                and self._bytes + nbytes <= self.max_bytes, self.wait_s)
            if not fits:
                raise APIError(429, f"server busy decoding other images; retry '{param}' "
                               "shortly", param, "decode_busy", {"Retry-After": "1"})
            self._decodes += 1
            self._bytes += nbytes

    def decoded(self) -> None:
        """A decode finished (or failed): its slot is free, its bytes stay reserved."""
        with self._cond:
            self._decodes -= 1
            self._cond.notify_all()

    def release(self, nbytes: int) -> None:
        """The decoded image is gone: its bytes are free."""
        with self._cond:
            self._bytes -= nbytes
            self._cond.notify_all()
        if nbytes >= _TRIM_AFTER_BYTES:
            release_freed_memory()


class Decoding:
    """One request's decodes; `decoding_session` releases their bytes at the end. A request's
    images together may hold at most the gate's `max_bytes` (else 400: it could never fit)."""

    def __init__(self, gate: DecodeGate | None) -> None:
        self.gate = gate
        self.reserved: list[int] = []

    @contextmanager
    def decode(self, nbytes: int, param: str) -> Iterator[None]:
        """Around one decode of about `nbytes`: a slot while it runs, the bytes until the
        session ends."""
        if self.gate is None:
            yield
            return
        if sum(self.reserved) + nbytes > self.gate.max_bytes:
            raise APIError(400, f"'{param}' and the request's other images would take about "
                           f"{(sum(self.reserved) + nbytes) // 2**20} MiB to decode; at most "
                           f"{self.gate.max_bytes // 2**20} MiB are accepted", param,
                           "image_too_large")
        self.gate.reserve(nbytes, param)
        self.reserved.append(nbytes)
        try:
            yield
        finally:
            self.gate.decoded()


@contextmanager
def decoding_session(gate: DecodeGate | None) -> Iterator[Decoding]:
    """Reservations for one request's images, released when the block ends (however)."""
    session = Decoding(gate)
    try:
        yield session
    finally:
        if gate is not None:
            for nbytes in session.reserved:
                gate.release(nbytes)


def _check_header(image: Image.Image, param: str) -> None:
    width, height = image.size
    problem = None
    if width < 1 or height < 1:
        problem = "has no pixels"
    elif max(width, height) > MAX_INPUT_SIDE:
        problem = f"has a side over {MAX_INPUT_SIDE} pixels"
    elif width * height > MAX_INPUT_PIXELS:
        problem = f"has more than {MAX_INPUT_PIXELS} pixels"
    elif max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        problem = f"is more than {MAX_ASPECT_RATIO} times longer than it is wide"
    if problem is not None:
        raise APIError(400, f"'{param}' is {width}x{height}: it {problem}; accepted: sides up "
                       f"to {MAX_INPUT_SIDE}, at most {MAX_INPUT_PIXELS} pixels, an aspect "
                       f"ratio up to {MAX_ASPECT_RATIO}:1", param, "image_too_large")


def decode_image(data: bytes, param: str, decoding: Decoding | None = None) -> Image.Image:
    """An uploaded image's bytes -> a loaded PIL image (first frame). With `decoding`, the
    decode is reserved on its gate first (429 when the gate is full)."""
    if not data:
        raise APIError(400, f"'{param}' is empty; send a PNG, JPEG or WebP image", param,
                       "invalid_image")
    try:
        image = Image.open(io.BytesIO(data), formats=INPUT_FORMATS)  # reads the header only
        _check_header(image, param)
        if decoding is None:
            image.load()
        else:
            with decoding.decode(decode_bytes_estimate(image), param):
                image.load()
    except APIError:
        raise
    except Image.DecompressionBombError:  # PIL's own cap, far above ours, hit in Image.open
        raise APIError(400, f"'{param}' has more than {MAX_INPUT_PIXELS} pixels; accepted: "
                       f"sides up to {MAX_INPUT_SIDE}, at most {MAX_INPUT_PIXELS} pixels",
                       param, "image_too_large") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        raise APIError(400, f"'{param}' could not be decoded as an image; send a PNG, JPEG or "
                       "WebP file", param, "invalid_image") from None
    return image


def decode_base64_image(text: str, param: str, decoding: Decoding | None = None
                        ) -> Image.Image:
    """A base64 string (optionally a `data:image/...;base64,` URL) -> a PIL image."""
    payload = _DATA_URL.sub("", text.strip(), count=1)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"'{param}' is not valid base64 (or a data:image/...;base64, URL)",
                       param, "invalid_base64") from None
    return decode_image(data, param, decoding)


def as_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "P", "PA"):
        # Composite on black, as diffusers' own RGB conversion of RGBA drops alpha.
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


def mask_for_pipeline(mask: Image.Image, image_size: tuple[int, int]) -> Image.Image:
    """An "L" mask, white = repaint; 400 when its size differs from the image's."""
    if mask.size != image_size:
        raise APIError(
            400,
            f"'mask' is {mask.size[0]}x{mask.size[1]} but 'image' is "
            f"{image_size[0]}x{image_size[1]}; they must be the same size",
            "mask",
            "mask_size_mismatch",
        )
    if "A" in mask.getbands() or (mask.mode == "P" and "transparency" in mask.info):
        alpha = mask.convert("RGBA").getchannel("A")
        return alpha.point(lambda a: 255 - a)  # transparent -> white -> repaint
    return mask.convert("L")


def resize_to(image: Image.Image, width: int, height: int, resample: int) -> Image.Image:
    return image if image.size == (width, height) else image.resize((width, height), resample)


def encode_image(image: Image.Image, output_format: str, compression: int | None = None) -> bytes:
    """PNG / JPEG / WebP bytes. PNG is lossless and deterministic; for the lossy formats
    `compression` is OpenAI's `output_compression` (0-100, default 100), used as the quality."""
    pil_format, _ = OUTPUT_FORMATS[output_format]
    buffer = io.BytesIO()
    if pil_format == "PNG":
        image.save(buffer, format="PNG")
    else:
        quality = 100 if compression is None else max(compression, 1)
        image.convert("RGB").save(buffer, format=pil_format, quality=quality)
    return buffer.getvalue()


def media_type(output_format: str) -> str:
    return OUTPUT_FORMATS[output_format][1]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _malloc_trim() -> ctypes._CFuncPtr | None:
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


_TRIM = _malloc_trim()


def release_freed_memory() -> None:
    """Hand memory freed by a large decode back to the system (glibc's `malloc_trim`).

    glibc keeps freed blocks of a few MiB in its arenas for reuse, so without this, one large
    upload leaves the process that much bigger for good. A no-op where malloc_trim is absent.
    """
    if _TRIM is not None:
        _TRIM(0)
