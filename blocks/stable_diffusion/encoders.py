"""Stable Diffusion encoder stages: prompts to CLIP embeddings, images to VAE posteriors.

Text: prompts are padded to the tokenizer's `model_max_length` (77 for CLIP), run through the
CLIP text encoder, and the last hidden state (after the final layer norm) is the
conditioning; `clip_skip=k` takes the hidden state k layers earlier, through the same layer
norm. With `guidance_scale > 1` the negative prompt (empty by default) is encoded too.

Images: user images are resized (LANCZOS, in their own mode) to the output size — by default
their own size rounded down to a multiple of the VAE factor for image-to-image, the UNet's
native size for inpainting, as in diffusers — and encoded by the VAE. The encoders stop at
the VAE *posterior* (its mean and log-variance): sampling from it draws on the generator,
and the denoise stage does every draw, in the reference pipelines' order, so that a seed
means the same image here as in diffusers. Image latents passed in directly are not handled.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers import AutoencoderKL
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from blocks.block import ModularPipelineBlocks
from blocks.errors import InvalidInput
from blocks.image_processing import image_list, image_size, to_pixels
from blocks.model_config import model_config
from blocks.model_config import vae_scale_factor as shared_vae_scale_factor
from blocks.prompts import (
    check_images_per_prompt,
    negative_prompt_list,
    prompt_list,
    repeat_per_prompt,
)
from blocks.specs import ComponentSpec, InputParam, OutputParam

logger = logging.getLogger(__name__)

DEFAULT_GUIDANCE_SCALE = 7.5
# SD 1.x/2.x: a 64-latent UNet and an 8x VAE, i.e. 512 px; used only where neither a loaded
# model nor its checkpoint says otherwise.
DEFAULT_SAMPLE_SIZE = 64
DEFAULT_VAE_SCALE_FACTOR = 8


# -- what the models say -----------------------------------------------------------------------


def vae_scale_factor(components: Any) -> int:
    """Pixels per latent: 2 ** (levels - 1) of the VAE, else SD's 8."""
    return shared_vae_scale_factor(components, DEFAULT_VAE_SCALE_FACTOR)


def default_size(components: Any) -> tuple[int, int]:
    """(height, width) in pixels when not given: the UNet's sample size times the VAE factor."""
    config = model_config(components, "unet")
    size = config["sample_size"] if config is not None else DEFAULT_SAMPLE_SIZE
    height, width = (size, size) if isinstance(size, int) else size
    factor = vae_scale_factor(components)
    return height * factor, width * factor


def uses_guidance(unet: Any, guidance_scale: float) -> bool:
    """Classifier-free guidance runs when `guidance_scale > 1`, except for UNets distilled with
    the guidance scale as an input (`time_cond_proj_dim`, e.g. LCM): they get it embedded."""
    return guidance_scale > 1 and unet.config.time_cond_proj_dim is None


# -- text --------------------------------------------------------------------------------------


def encode_prompts(
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    prompts: list[str],
    device: torch.device,
    max_length: int | None = None,
    clip_skip: int | None = None,
) -> torch.Tensor:
    """(P, L, D) CLIP embeddings of P prompts, in the text encoder's dtype, on `device`."""
    max_length = max_length or tokenizer.model_max_length
    tokens = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                       return_tensors="pt")
    untruncated = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
    if untruncated.shape[-1] > max_length:
        logger.warning("prompts were truncated to CLIP's %d tokens", max_length)
    attention_mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        attention_mask = tokens.attention_mask.to(text_encoder.device)
    input_ids = tokens.input_ids.to(text_encoder.device)
    if clip_skip is None:
        embeds = text_encoder(input_ids, attention_mask=attention_mask)[0]
    else:
        output = text_encoder(input_ids, attention_mask=attention_mask, output_hidden_states=True)
        # The final layer norm belongs to the representation the UNet was trained on, so the
        # earlier layer goes through it too. (transformers < 5 nests it under `text_model`.)
        final_layer_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
        embeds = final_layer_norm(output.hidden_states[-(clip_skip + 1)])
    return embeds.to(dtype=text_encoder.dtype, device=device)


class StableDiffusionTextEncoderStep(ModularPipelineBlocks):
    model_name = "stable-diffusion"
    description = (
        "Encodes the prompts with CLIP, and the negative prompts when guidance_scale > 1 "
        "(for classifier-free guidance)."
    )
    expected_components = [
        ComponentSpec("text_encoder", CLIPTextModel, "CLIP text encoder."),
        ComponentSpec("tokenizer", CLIPTokenizer, "CLIP tokenizer."),
    ]
    inputs = [
        InputParam("prompt", str | list[str], required=True, description="What to draw."),
        InputParam("negative_prompt", str | list[str],
                   description="What to steer away from (with guidance); '' by default."),
        InputParam("num_images_per_prompt", int, default=1),
        InputParam("guidance_scale", float, default=DEFAULT_GUIDANCE_SCALE,
                   description="Classifier-free guidance scale; > 1 enables it."),
        InputParam("clip_skip", int,
                   description="Use the hidden state this many layers before the last."),
    ]
    intermediate_outputs = [
        OutputParam("prompt_embeds", torch.Tensor, "(B, 77, D) text embeddings.",
                    kwargs_type="denoiser_input_fields"),
        OutputParam("negative_prompt_embeds", torch.Tensor,
                    "(B, 77, D) negative embeddings; None when guidance_scale <= 1.",
                    kwargs_type="denoiser_input_fields"),
        OutputParam("batch_size", int, "Number of images: prompts x num_images_per_prompt."),
    ]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        prompts = prompt_list(block_state.prompt, self.path)
        n = check_images_per_prompt(block_state.num_images_per_prompt, self.path)
        clip_skip = block_state.clip_skip
        layers = components.text_encoder.config.num_hidden_layers
        if clip_skip is not None and not 0 <= clip_skip < layers:
            raise InvalidInput(f"{self.path}: clip_skip must be in 0..{layers - 1}, got "
                               f"{clip_skip}", "clip_skip")
        device = components._execution_device
        embeds = encode_prompts(components.text_encoder, components.tokenizer, prompts, device,
                                clip_skip=clip_skip)
        block_state.prompt_embeds = repeat_per_prompt(embeds, n)
        block_state.negative_prompt_embeds = None
        # The UNet decides whether guidance really runs (see `uses_guidance`); a guidance-
        # distilled UNet just leaves these unused.
        if block_state.guidance_scale > 1:
            negatives = negative_prompt_list(block_state.negative_prompt, len(prompts), self.path)
            # Negatives never use clip_skip, as in diffusers.
            negative_embeds = encode_prompts(components.text_encoder, components.tokenizer,
                                             negatives, device, max_length=embeds.shape[1])
            block_state.negative_prompt_embeds = repeat_per_prompt(negative_embeds, n)
        block_state.batch_size = block_state.prompt_embeds.shape[0]
        self.set_block_state(state, block_state)
        return components, state


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


class StableDiffusionImagePreprocessStep(ModularPipelineBlocks):
    model_name = "stable-diffusion"
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


class StableDiffusionInpaintPreprocessStep(ModularPipelineBlocks):
    model_name = "stable-diffusion"
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


class StableDiffusionVaeEncodeStep(ModularPipelineBlocks):
    model_name = "stable-diffusion"
    description = "Encodes the image(s) to edit to VAE posteriors (sampled later, in denoise)."
    expected_components = [ComponentSpec("vae", AutoencoderKL, "SD's VAE.")]
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


class StableDiffusionInpaintVaeEncodeStep(ModularPipelineBlocks):
    model_name = "stable-diffusion"
    description = "Encodes the image and the masked image to VAE posteriors."
    expected_components = [ComponentSpec("vae", AutoencoderKL, "SD's VAE.")]
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
