"""Images across the HTTP boundary: decoding uploads and base64, masks, encoding outputs.

Every decoding failure is an `APIError` (400) naming the field, never a PIL traceback.
Masks follow OpenAI's convention: where the mask is transparent, the image is edited. A mask
without alpha is read as grayscale, white = edit (diffusers' convention). The result handed to
pipelines is always an "L" image, white = repaint.

Not handled here: resizing policy beyond "make it the requested size", colour management,
animated images (the first frame is used).
"""

from __future__ import annotations

import base64
import binascii
import io
import re

from PIL import Image, UnidentifiedImageError

from service.errors import APIError

MAX_INPUT_PIXELS = 4096 * 4096
OUTPUT_FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg"),
                  "webp": ("WEBP", "image/webp")}
_DATA_URL = re.compile(r"^data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)


def decode_image(data: bytes, param: str) -> Image.Image:
    """An uploaded image's bytes -> a loaded PIL image (first frame)."""
    if not data:
        raise APIError(400, f"'{param}' is empty; send a PNG, JPEG or WebP image", param,
                       "invalid_image")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > MAX_INPUT_PIXELS:
            raise APIError(400, f"'{param}' is {width}x{height}; at most {MAX_INPUT_PIXELS} "
                           "pixels are accepted", param, "image_too_large")
        image.load()
    except APIError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise APIError(400, f"'{param}' could not be decoded as an image; send a PNG, JPEG or "
                       "WebP file", param, "invalid_image") from None
    return image


def decode_base64_image(text: str, param: str) -> Image.Image:
    """A base64 string (optionally a `data:image/...;base64,` URL) -> a PIL image."""
    payload = _DATA_URL.sub("", text.strip(), count=1)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"'{param}' is not valid base64 (or a data:image/...;base64, URL)",
                       param, "invalid_base64") from None
    return decode_image(data, param)


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
