"""Progress previews: denoising latents -> small RGB images, with no VAE decode.

Each latent channel contributes a fixed RGB colour (`FamilySupport.latent_rgb_factors`, the
linear approximation ComfyUI and A1111 preview with), so a preview costs one tiny matmul per
image and is made at the latents' own resolution (1/8 of the output for SD; the demo denoises
pixels). Callers scale it up for display. It is an impression of where the image is going, not
the image: colours and detail differ from the decoded result.

Not handled: packed-token latents (FLUX.2's (B, S, C)), which get no preview, and decoding
with a real (or tiny) VAE every k steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image


def latent_previews(
    latents: torch.Tensor, factors: Sequence[Sequence[float]] | None
) -> list[Image.Image] | None:
    """(B, C, h, w) latents -> B RGB images of h x w; None when there is no mapping for them."""
    if factors is None or not isinstance(latents, torch.Tensor) or latents.ndim != 4:
        return None
    if latents.shape[1] != len(factors):
        return None
    weights = torch.tensor(factors, dtype=torch.float32)  # (C, 3)
    rgb = torch.einsum("bchw,cr->bhwr", latents.detach().float().cpu(), weights)  # (B, h, w, 3)
    pixels = ((rgb + 1) * 127.5).clamp(0, 255).round().to(torch.uint8).numpy()
    return [Image.fromarray(image, "RGB") for image in pixels]


def scaled_preview(image: Image.Image, width: int, height: int) -> Image.Image:
    """`image` scaled to `width` x `height` (bilinear), for showing a preview at output size."""
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.BILINEAR)
