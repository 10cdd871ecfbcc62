"""Pixels in and out of pipelines: user images to tensors, decoded tensors to outputs.

The conversions follow diffusers' conventions exactly (PIL -> float32 / 255; outputs
denormalised with `x / 2 + 0.5`, clamped, and rounded to uint8 for PIL), so images match the
reference pipelines bit for bit. Family-specific resizing rules (multiples of a VAE factor,
area limits) live in the families, not here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from blocks.errors import InvalidInput

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
ImageInput = Image.Image | np.ndarray | torch.Tensor | Sequence[Any]


def check_output_type(output_type: str, owner: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise InvalidInput(
            f"{owner}: output_type {output_type!r} is not one of {', '.join(OUTPUT_TYPES)}",
            "output_type",
        )


def image_list(image: ImageInput) -> list[Any]:
    """One image or a batch as a list of single images."""
    if isinstance(image, (list, tuple)):
        return list(image)
    if isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 4:
        return list(image)
    return [image]


def image_size(image: Any) -> tuple[int, int]:
    """(height, width) of a PIL image, an (H, W[, C]) array or a (C, H, W) tensor."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    if isinstance(image, torch.Tensor):
        return int(image.shape[-2]), int(image.shape[-1])
    return int(image.shape[0]), int(image.shape[1])


def to_pixels(
    image: ImageInput,
    height: int | None = None,
    width: int | None = None,
    mode: str = "RGB",
    resample: int = Image.LANCZOS,
) -> torch.Tensor:
    """(B, C, H, W) float32 in [0, 1], resized to `height` x `width` when given.

    PIL images are converted to `mode` and resized with `resample`; arrays are (H, W, C) in
    [0, 1]; tensors are (C, H, W) in [0, 1] and resized with nearest interpolation, as
    diffusers does for tensors. Pixels from PIL images and arrays come back as a channels-last
    strided view of one (B, H, W, C) array, the layout diffusers' image processor produces:
    convolutions pick kernels by layout, so matching it keeps results bit-identical.
    """
    items = image_list(image)
    if all(isinstance(item, torch.Tensor) for item in items):
        batch = torch.stack([item.float() for item in items])  # (B, C, H, W)
    else:
        arrays = [_pixel_array(item, height, width, mode, resample) for item in items]
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, C, H, W) view
    if height is not None and width is not None and batch.shape[-2:] != (height, width):
        batch = torch.nn.functional.interpolate(batch, size=(height, width))
    return batch


def _pixel_array(
    item: Any, height: int | None, width: int | None, mode: str, resample: int
) -> np.ndarray:
    """One image as an (H, W, C) float32 array in [0, 1]."""
    if isinstance(item, Image.Image):
        # Resize in the image's own mode, then convert: diffusers' order, and the results differ.
        if height is not None and width is not None and item.size != (width, height):
            item = item.resize((width, height), resample=resample)
        item = item.convert(mode)
        array = np.array(item).astype(np.float32) / 255.0
    elif isinstance(item, np.ndarray):
        array = item.astype(np.float32)
    else:
        raise TypeError(f"unsupported image type {type(item).__name__}; "
                        "use PIL images, numpy arrays or torch tensors (not mixed)")
    return array[:, :, None] if array.ndim == 2 else array


def postprocess(images: torch.Tensor, output_type: str = "pil") -> Any:
    """Decoded images in [-1, 1], (B, C, H, W) -> PIL list, (B, H, W, C) array or tensor."""
    if output_type == "latent":
        return images
    images = (images / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images
    arrays = images.cpu().permute(0, 2, 3, 1).float().numpy()  # (B, H, W, C)
    if output_type == "np":
        return arrays
    return [Image.fromarray(a) for a in (arrays * 255).round().astype("uint8")]
