"""A latent -> RGB map fitted on a VAE, for progress previews without decoding.

A preview maps each latent pixel to a colour with one small affine map (no VAE decode), so it
costs a matmul per step. Borrowed constants (the ones ComfyUI uses for SD 1.x) only fit the
VAE they were made for: on another VAE, such as the default shapes model's, the previews were
the wrong colours. So the map is fitted on the model's own VAE (`fit_latent_rgb`): synthetic
images (flat colours, shapes, gradients) are encoded, the latents scaled as the denoiser sees
them, decoded again, and the decoded images, averaged down to the latents' resolution, are
regressed on the latents by least squares (weights and a bias per RGB channel). It takes a few
encoder/decoder calls on 64x64 images. A model without a VAE (one that denoises pixels)
previews its 3-channel latents as pixels (`PIXELS`).

Here, in the library, because it needs only a VAE: the service fits it where the VAE is (in
its process, or on the VAE deployment in Ray mode) and caches it (`service.latent_rgb`).

Not handled here: packed-token latents (FLUX.2's (B, S, C)), which get no preview, and which
latents to preview (the service previews the scheduler's estimate of the clean latents).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, ImageDraw

FIT_IMAGES = 12
FIT_SIZE = 64  # pixels a side: a few latent pixels even for 8x VAEs, cheap even for big ones


@dataclass(frozen=True)
class LatentRGB:
    """rgb = latents . weights + bias, in the decoder's [-1, 1] output range."""

    weights: torch.Tensor  # (C, 3)
    bias: torch.Tensor  # (3,)

    @property
    def channels(self) -> int:
        return self.weights.shape[0]

    def rgb(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, h, w, 3) in about [-1, 1]."""
        return torch.einsum("bchw,cr->bhwr", latents.detach().float().cpu(),
                            self.weights) + self.bias

    def images(self, latents: Any) -> list[Image.Image] | None:
        """(B, C, h, w) latents -> B RGB images of h x w; None when they are not such
        latents (packed tokens, another channel count)."""
        if (not isinstance(latents, torch.Tensor) or latents.ndim != 4
                or latents.shape[1] != self.channels):
            return None
        pixels = ((self.rgb(latents) + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)
        return [Image.fromarray(image, "RGB") for image in pixels.numpy()]


PIXELS = LatentRGB(torch.eye(3), torch.zeros(3))  # latents that are pixels already


def _synthetic_images(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """(count, 3, size, size) in [-1, 1]: flat colours, shapes and gradients, fixed by seed."""
    rng = random.Random(seed)
    images = []
    for index in range(count):
        def colour() -> tuple[int, int, int]:
            return (rng.randrange(256), rng.randrange(256), rng.randrange(256))

        image = Image.new("RGB", (size, size), colour())
        draw = ImageDraw.Draw(image)
        if index % 3 == 2:  # a horizontal gradient between two colours
            left, right = colour(), colour()
            for x in range(size):
                t = x / (size - 1)
                draw.line([(x, 0), (x, size)], fill=tuple(
                    round(a + (b - a) * t) for a, b in zip(left, right, strict=True)))
        for _ in range(rng.randrange(1, 4)):
            x0, y0 = rng.randrange(size - 8), rng.randrange(size - 8)
            box = (x0, y0, rng.randrange(x0 + 8, size + 1), rng.randrange(y0 + 8, size + 1))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour())
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        images.append(pixels.view(size, size, 3).permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(images)


@torch.no_grad()
def fit_latent_rgb(vae: Any, images: int = FIT_IMAGES, size: int = FIT_SIZE) -> LatentRGB:
    """Fit the affine latent -> RGB map of `vae` (a diffusers `AutoencoderKL`-like model)."""
    parameter = next(vae.parameters())
    pixels = _synthetic_images(images, size).to(parameter.device, parameter.dtype)
    latents = vae.encode(pixels).latent_dist.mode()
    decoded = vae.decode(latents).sample.float().clamp(-1, 1)
    scale = getattr(vae.config, "scaling_factor", None) or 1.0
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    scaled = ((latents.float() - shift) * scale).cpu()  # what the denoiser works on
    factor = decoded.shape[-1] // scaled.shape[-1]
    target = torch.nn.functional.avg_pool2d(decoded.cpu(), factor)  # (B, 3, h, w)
    channels = scaled.shape[1]
    inputs = scaled.permute(0, 2, 3, 1).reshape(-1, channels)
    inputs = torch.cat([inputs, torch.ones(len(inputs), 1)], dim=1)  # (N, C + 1)
    outputs = target.permute(0, 2, 3, 1).reshape(-1, 3)  # (N, 3)
    solution = torch.linalg.lstsq(inputs.double(), outputs.double()).solution.float()
    return LatentRGB(solution[:channels].contiguous(), solution[channels].contiguous())
