"""The VAE stages of UNet latent-diffusion pipelines (Stable Diffusion 1.x/2.x, SDXL): user
images in, VAE posteriors out; denoised latents in, images out.

Images: user images are resized (LANCZOS, in their own mode) to the output size — by default
their own size rounded down to a multiple of the VAE factor for image-to-image, the UNet's
native size for inpainting, as in diffusers — and encoded by the VAE. The encoders stop at
the VAE *posterior* (its mean and log-variance): sampling from it draws on the generator,
and the denoise stage does every draw, in the reference pipelines' order, so that a seed
means the same image here as in diffusers. Decoding divides the latents by the VAE's scaling
factor and turns the decoded pixels into PIL images, arrays or tensors
(`blocks.image_processing.postprocess`); `output_type="latent"` returns the latents as they are.

Not handled here: image latents passed in directly; VAEs whose config normalises latents per
channel (`latents_mean` / `latents_std`, e.g. Playground v2.5: refused with an error); a safety
checker or watermark (images are returned as decoded); float16 VAEs that overflow
(`force_upcast`): load the VAE in float32.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL
from PIL import Image

from blocks.block import ModularPipelineBlocks
from blocks.composites import AutoPipelineBlocks, SequentialPipelineBlocks
from blocks.errors import InvalidInput
from blocks.image_processing import (
    check_output_type,
    image_list,
    image_size,
    postprocess,
    to_pixels,
)
from blocks.model_config import model_config
from blocks.model_config import vae_scale_factor as shared_vae_scale_factor
from blocks.specs import ComponentSpec, InputParam, OutputParam

# SD 1.x/2.x: a 64-latent UNet and an 8x VAE, i.e. 512 px; used only where neither a loaded
# model nor its checkpoint says otherwise.
DEFAULT_SAMPLE_SIZE = 64
DEFAULT_VAE_SCALE_FACTOR = 8
# SD 1.x/2.x's VAE latent scale, where no VAE config says otherwise (SDXL's config says 0.13025).
DEFAULT_VAE_SCALING_FACTOR = 0.18215


def vae_spec() -> ComponentSpec:
    return ComponentSpec("vae", AutoencoderKL, "The VAE between pixels and latents.")


# -- what the models say -----------------------------------------------------------------------


def vae_scale_factor(components: Any) -> int:
    """Pixels per latent: 2 ** (levels - 1) of the VAE, else SD's 8."""
    return shared_vae_scale_factor(components, DEFAULT_VAE_SCALE_FACTOR)


def vae_scaling_factor(components: Any, owner: str) -> float:
    """The VAE's latent scale (from its config), else SD's; an error for a VAE that also
    normalises latents per channel, which these stages do not do."""
    config = model_config(components, "vae")
    if config is None:
        return DEFAULT_VAE_SCALING_FACTOR
    if config.get("latents_mean") is not None or config.get("latents_std") is not None:
        raise ValueError(f"{owner}: this VAE normalises latents per channel (latents_mean / "
                         "latents_std), which these blocks do not support")
    return config["scaling_factor"]


def default_size(components: Any) -> tuple[int, int]:
    """(height, width) in pixels when not given: the UNet's sample size times the VAE factor."""
    config = model_config(components, "unet")
    size = config["sample_size"] if config is not None else DEFAULT_SAMPLE_SIZE
    height, width = (size, size) if isinstance(size, int) else size
    factor = vae_scale_factor(components)
    return height * factor, width * factor


# -- images ------------------------------------------------------------------------------------


def preprocess_images(
    image: Any, height: int | None, width: int | None, multiple_of: int, mode: str = "RGB"
) -> torch.Tensor:
    """User images -> (B, C, H, W) float32 in [0, 1], as diffusers' `VaeImageProcessor`.

    The size defaults to the first image's, rounded down to `multiple_of`. PIL images are
    resized with LANCZOS in their own mode and only then converted to `mode` (diffusers'
    order; converting first changes a few pixel values). Arrays are (H, W[, C]) in [0, 1],
    tensors (C, H, W) in [0, 1].
    """
    images = image_list(image)
    if not images:
        raise InvalidInput("got an empty list of images", "image")
    if height is None or width is None:
        own_height, own_width = image_size(images[0])
        height = height or own_height - own_height % multiple_of
        width = width or own_width - own_width % multiple_of
    images = [
        item.resize((width, height), resample=Image.LANCZOS)
        if isinstance(item, Image.Image) and item.size != (width, height) else item
        for item in images
    ]
    return to_pixels(images, height, width, mode=mode)


def check_size(height: int, width: int, multiple_of: int, owner: str) -> None:
    if height % multiple_of or width % multiple_of or height <= 0 or width <= 0:
        raise InvalidInput(f"{owner}: height and width must be positive multiples of "
                           f"{multiple_of}, got {height}x{width}", "height")


def vae_input(pixels: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels -> [-1, 1], channels-last.

    Channels-last is the layout PIL pixels come in and diffusers hands the VAE; its
    convolutions then take the same kernels and the latents match bit for bit.
    """
    return (pixels * 2 - 1).contiguous(memory_format=torch.channels_last)


def encode_posterior(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 2c, h, w) VAE posterior: mean and log-variance.

    Images are encoded one at a time, so an image's posterior never depends on its batch.
    """
    images = images.to(device=vae.device, dtype=vae.dtype)
    return torch.cat([
        vae.encode(images[i : i + 1]).latent_dist.parameters for i in range(images.shape[0])
    ])


class UNetImagePreprocessStep(ModularPipelineBlocks):
    description = (
        "Resizes the image(s) to edit and scales them to [-1, 1]; their size (rounded down to "
        "a multiple of the VAE factor) is the output size unless height/width are given."
    )
    inputs = [
        InputParam("image", Image.Image | list, required=True,
                   description="The image(s) to edit: PIL, (H, W, C) arrays or (C, H, W) "
                               "tensors in [0, 1]."),
        InputParam("height", int),
        InputParam("width", int),
    ]
    intermediate_outputs = [
        OutputParam("processed_image", torch.Tensor, "(K, 3, H, W) in [-1, 1]."),
        OutputParam("height", int, "Output height in pixels."),
        OutputParam("width", int, "Output width in pixels."),
    ]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        factor = vae_scale_factor(components)
        pixels = preprocess_images(block_state.image, block_state.height, block_state.width, factor)
        block_state.height, block_state.width = pixels.shape[-2:]
        check_size(block_state.height, block_state.width, factor, self.path)
        block_state.processed_image = vae_input(pixels)
        self.set_block_state(state, block_state)
        return components, state


class UNetInpaintPreprocessStep(ModularPipelineBlocks):
    description = (
        "Resizes the image and the mask to the output size (the UNet's native size unless "
        "height/width are given), binarises the mask (white = repaint) and blanks the "
        "masked region of the image."
    )
    inputs = [
        InputParam("image", Image.Image | list, required=True, description="The image to edit."),
        InputParam("mask_image", Image.Image | list, required=True,
                   description="Where to repaint: white (>= 0.5) is repainted, black kept."),
        InputParam("height", int),
        InputParam("width", int),
    ]
    intermediate_outputs = [
        OutputParam("processed_image", torch.Tensor, "(K, 3, H, W) in [-1, 1]."),
        OutputParam("mask", torch.Tensor, "(K, 1, H, W) binary mask, 1 = repaint."),
        OutputParam("masked_image", torch.Tensor,
                    "(K, 3, H, W) the image with the repainted region set to 0."),
        OutputParam("height", int, "Output height in pixels."),
        OutputParam("width", int, "Output width in pixels."),
    ]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        factor = vae_scale_factor(components)
        default_height, default_width = default_size(components)
        height = block_state.height or default_height
        width = block_state.width or default_width
        check_size(height, width, factor, self.path)
        image = vae_input(preprocess_images(block_state.image, height, width, factor))
        mask = preprocess_images(block_state.mask_image, height, width, factor, mode="L")
        mask = (mask >= 0.5).to(mask.dtype)  # (K, 1, H, W)
        block_state.processed_image = image
        block_state.mask = mask
        block_state.masked_image = image * (mask < 0.5)
        block_state.height, block_state.width = height, width
        self.set_block_state(state, block_state)
        return components, state


class UNetVaeEncodeStep(ModularPipelineBlocks):
    description = "Encodes the image(s) to edit to VAE posteriors (sampled later, in denoise)."
    expected_components = [vae_spec()]
    inputs = [
        InputParam("processed_image", torch.Tensor, required=True,
                   description="(K, 3, H, W) in [-1, 1]."),
    ]
    intermediate_outputs = [
        OutputParam("image_posterior", torch.Tensor,
                    "(K, 2c, h, w) VAE posterior mean and log-variance of each image."),
    ]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        block_state.image_posterior = encode_posterior(components.vae, block_state.processed_image)
        self.set_block_state(state, block_state)
        return components, state


class UNetInpaintVaeEncodeStep(ModularPipelineBlocks):
    description = "Encodes the image and the masked image to VAE posteriors."
    expected_components = [vae_spec()]
    inputs = [
        InputParam("processed_image", torch.Tensor, required=True,
                   description="(K, 3, H, W) in [-1, 1]."),
        InputParam("masked_image", torch.Tensor, required=True,
                   description="(K, 3, H, W) with the repainted region blanked."),
    ]
    intermediate_outputs = [
        OutputParam("image_posterior", torch.Tensor, "(K, 2c, h, w) of the image."),
        OutputParam("masked_image_posterior", torch.Tensor, "(K, 2c, h, w) of the masked image."),
    ]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        vae = components.vae
        block_state.image_posterior = encode_posterior(vae, block_state.processed_image)
        block_state.masked_image_posterior = encode_posterior(vae, block_state.masked_image)
        self.set_block_state(state, block_state)
        return components, state


class UNetImg2ImgVaeEncoderStep(SequentialPipelineBlocks):
    description = "Preprocesses the image to edit and encodes it to a VAE posterior."
    block_classes = [UNetImagePreprocessStep, UNetVaeEncodeStep]
    block_names = ["preprocess", "encode"]


class UNetInpaintVaeEncoderStep(SequentialPipelineBlocks):
    description = "Preprocesses the image and mask and encodes the image and masked image."
    block_classes = [UNetInpaintPreprocessStep, UNetInpaintVaeEncodeStep]
    block_names = ["preprocess", "encode"]


class UNetAutoVaeEncoderStep(AutoPipelineBlocks):
    block_classes = [UNetInpaintVaeEncoderStep, UNetImg2ImgVaeEncoderStep]
    block_names = ["inpaint", "image2image"]
    block_trigger_inputs = ["mask_image", "image"]


# -- decoding ----------------------------------------------------------------------------------


class UNetDecodeStep(ModularPipelineBlocks):
    description = "Decodes the denoised latents with the VAE."
    expected_components = [vae_spec()]
    inputs = [
        InputParam("latents", torch.Tensor, required=True, description="(B, c, h, w) denoised."),
        InputParam("output_type", str, default="pil",
                   description="'pil', 'np', 'pt', or 'latent' for the undecoded latents."),
    ]
    intermediate_outputs = [
        OutputParam("images", list, "PIL images, a (B, H, W, 3) array or a (B, 3, H, W) "
                                    "tensor in [0, 1], or the (B, c, h, w) latents."),
    ]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        check_output_type(block_state.output_type, self.path)
        if block_state.output_type == "latent":
            block_state.images = block_state.latents
        else:
            vae = components.vae
            latents = block_state.latents.to(device=vae.device, dtype=vae.dtype)
            scaling_factor = vae_scaling_factor(components, self.path)
            decoded = vae.decode(latents / scaling_factor, return_dict=False)[0]
            block_state.images = postprocess(decoded, block_state.output_type)
        self.set_block_state(state, block_state)
        return components, state
