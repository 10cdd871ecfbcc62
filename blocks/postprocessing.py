"""Post-processing blocks for any family: run after `decode`, on the finished `images`.

    blocks.sub_blocks["filter"] = ImageFilterBlock()    # appended after decode
    blocks.sub_blocks["upscale"] = UpscaleBlock()
    image = pipe(prompt="...", contrast=1.2, scale=2).images[0]

Both read and write `images` in whatever form the decoder produced: a list of PIL images, a
(B, H, W, C) float array in [0, 1] (`output_type="np"`) or a (B, C, H, W) float tensor in
[0, 1] (`output_type="pt"`), and return the same form. Latents (`output_type="latent"`) are
refused. The filters are computed in float on (B, C, H, W) tensors, so arrays and tensors keep
their precision; PIL images are converted to float and rounded back to 8 bits once.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from blocks.block import ModularPipelineBlocks
from blocks.errors import InvalidInput
from blocks.specs import InputParam, OutputParam

# PIL's SMOOTH kernel: what `ImageEnhance.Sharpness` blends away from.
_SMOOTH_KERNEL = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
# ITU-R 601-2 luma, as PIL's "L" conversion.
_LUMA = (0.299, 0.587, 0.114)


def _as_tensor(images: Any, owner: str) -> tuple[torch.Tensor, str]:
    """Images -> ((B, C, H, W) float in [0, 1], the form they came in)."""
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, list) and images and all(isinstance(i, Image.Image) for i in images):
        arrays = [np.asarray(i.convert("RGB"), dtype=np.float32) / 255.0 for i in images]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2), "pil"
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.dtype.kind == "f":
        return torch.from_numpy(images).permute(0, 3, 1, 2), "np"
    if isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[1] in (1, 3):
        return images, "pt"
    raise InvalidInput(f"{owner}: images must be PIL images, a (B, H, W, C) float array or a "
                       f"(B, C, H, W) image tensor (not latents), got {type(images).__name__}")


def _from_tensor(images: torch.Tensor, form: str, like: Any) -> Any:
    """(B, C, H, W) in [0, 1] back to the form (and tensor dtype/device) of `like`."""
    if form == "pt":
        return images.to(device=like.device, dtype=like.dtype)
    arrays = images.permute(0, 2, 3, 1).cpu().numpy()
    if form == "np":
        return arrays
    return [Image.fromarray(a) for a in (arrays * 255).round().astype(np.uint8)]


def _luma(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) grey levels (a 1-channel image is its own)."""
    if images.shape[1] == 1:
        return images
    weights = images.new_tensor(_LUMA).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def _blend(base: torch.Tensor, images: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL ImageEnhance's rule: factor 0 gives `base`, 1 the image, > 1 extrapolates."""
    return (base + factor * (images - base)).clamp(0, 1)


def _smooth(images: torch.Tensor) -> torch.Tensor:
    """3x3 smoothing per channel; the one-pixel border is kept as is (as PIL does)."""
    channels = images.shape[1]
    kernel = _SMOOTH_KERNEL.to(images).expand(channels, 1, 3, 3)
    smoothed = torch.nn.functional.conv2d(images, kernel, groups=channels)
    result = images.clone()
    result[..., 1:-1, 1:-1] = smoothed
    return result


def adjust_images(
    images: torch.Tensor, brightness: float, contrast: float, saturation: float, sharpness: float
) -> torch.Tensor:
    """(B, C, H, W) in [0, 1], adjusted like PIL's ImageEnhance, in that order. A factor of
    1.0 leaves that property unchanged; 0 gives black, flat grey, greyscale, smoothed."""
    if brightness != 1.0:
        images = _blend(torch.zeros_like(images), images, brightness)
    if contrast != 1.0:
        mean = _luma(images).mean(dim=(1, 2, 3), keepdim=True)
        images = _blend(mean.expand_as(images), images, contrast)
    if saturation != 1.0:
        images = _blend(_luma(images).expand_as(images), images, saturation)
    if sharpness != 1.0 and min(images.shape[-2:]) >= 3:
        images = _blend(_smooth(images), images, sharpness)
    return images


class ImageFilterBlock(ModularPipelineBlocks):
    description = (
        "Adjusts brightness, contrast, saturation and sharpness of the images (1.0 = "
        "unchanged, as PIL's ImageEnhance)."
    )
    inputs = [
        InputParam("images", required=True,
                   description="PIL images, a (B, H, W, C) array or a (B, C, H, W) tensor."),
        InputParam("brightness", float, default=1.0, description="0 black, 1 unchanged."),
        InputParam("contrast", float, default=1.0, description="0 flat grey, 1 unchanged."),
        InputParam("saturation", float, default=1.0, description="0 greyscale, 1 unchanged."),
        InputParam("sharpness", float, default=1.0, description="0 smoothed, 1 unchanged, "
                                                                 "2 sharpened."),
    ]
    intermediate_outputs = [OutputParam("images", description="The adjusted images, same form.")]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        factors = {name: block_state[name]
                   for name in ("brightness", "contrast", "saturation", "sharpness")}
        negative = {name: value for name, value in factors.items() if value < 0}
        if negative:
            raise InvalidInput(f"{self.path}: factors must be >= 0, got {negative}",
                               ", ".join(negative))
        if any(value != 1.0 for value in factors.values()):
            images, form = _as_tensor(block_state.images, self.path)
            adjusted = adjust_images(images.float(), **factors)
            block_state.images = _from_tensor(adjusted, form, block_state.images)
        self.set_block_state(state, block_state)
        return components, state


def _lanczos(channel: np.ndarray, width: int, height: int) -> np.ndarray:
    """One (H, W) float32 channel resized with PIL's LANCZOS filter, in float."""
    return np.asarray(Image.fromarray(channel).resize((width, height), Image.LANCZOS))


class UpscaleBlock(ModularPipelineBlocks):
    description = "Upscales the images by `scale` with a Lanczos filter."
    inputs = [
        InputParam("images", required=True,
                   description="PIL images, a (B, H, W, C) array or a (B, C, H, W) tensor."),
        InputParam("scale", float, default=2, description="Size factor, > 0 (2 doubles)."),
    ]
    intermediate_outputs = [OutputParam("images", description="The resized images, same form.")]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        scale = block_state.scale
        if not scale > 0:
            raise InvalidInput(f"{self.path}: scale must be > 0, got {scale}", "scale")
        images = block_state.images
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, list) and all(isinstance(i, Image.Image) for i in images):
            block_state.images = [
                image.resize((round(image.width * scale), round(image.height * scale)),
                             Image.LANCZOS)
                for image in images
            ]
        else:
            # Arrays and tensors: the same filter, in float (PIL's 32-bit float mode), one
            # channel at a time; Lanczos overshoots a little, hence the clamp.
            pixels, form = _as_tensor(images, self.path)
            arrays = pixels.float().cpu().numpy()  # (B, C, H, W)
            height, width = (round(size * scale) for size in arrays.shape[-2:])
            resized = np.stack([
                np.stack([_lanczos(channel, width, height) for channel in image])
                for image in arrays
            ])
            result = torch.from_numpy(resized).clamp(0, 1)
            block_state.images = _from_tensor(result, form, images)
        self.set_block_state(state, block_state)
        return components, state
