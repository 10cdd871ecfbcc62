"""Progress previews at the output size.

The latents -> RGB map itself is fitted per model on its own VAE (`service.latent_rgb`); a
preview is made at the latents' resolution (1/8 of the output for a VAE that scales by 8).
Here it is scaled up for display. It is an impression of where the image is going, not the image.

Not handled here: decoding with a real (or tiny) VAE every k steps.
"""

from __future__ import annotations

from PIL import Image


def scaled_preview(image: Image.Image, width: int, height: int) -> Image.Image:
    """`image` scaled to `width` x `height` (bilinear), for showing a preview at output size."""
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.BILINEAR)
