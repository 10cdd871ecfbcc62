"""Stable Diffusion XL's own steps before the denoise loop: its micro-conditioning and its
strength defaults. Timesteps, latents and masks are the UNet framework's (`blocks.unet_latents`).

Micro-conditioning: SDXL's UNet takes six numbers per image besides the text, the size the
training image originally had, the top-left corner of its crop, and the size of the output, as
(height, width) pairs. `original_size` and `target_size` default to the output size,
`crops_coords_top_left` to (0, 0). The negative conditioning of guidance gets its own
(`negative_original_size`, `negative_crops_coords_top_left`, `negative_target_size`), each
defaulting to its positive counterpart; asking for a small negative original size is how SDXL
steers away from low-resolution looks.

Three of diffusers' choices are not followed, so that a value given is a value used and an
image does not depend on its batch: its text-to-image pipeline ignores the negative sizes
unless both are given (and then takes (0, 0) for an unset negative crop), and with more than
one image it pairs the images' rows with alternating negative and positive time ids; its
image-to-image and inpainting pipelines ignore `negative_crops_coords_top_left`. Where
diffusers uses what it is given, the images are the same; in a batch, each image is the one
diffusers makes alone.

Not handled here: the refiner's aesthetic-score conditioning (`requires_aesthetics_score`: the
UNet's added embedding then has another width, which is refused with an error).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from blocks.block import ModularPipelineBlocks
from blocks.errors import InvalidInput
from blocks.specs import InputParam, OutputParam
from blocks.unet_latents import (
    UNetImg2ImgSetTimestepsStep,
    UNetInpaintSetTimestepsStep,
    unet_spec,
)


class StableDiffusionXLImg2ImgSetTimestepsStep(UNetImg2ImgSetTimestepsStep):
    model_name = "stable-diffusion-xl"
    default_strength = 0.3  # diffusers' SDXL image-to-image default


class StableDiffusionXLInpaintSetTimestepsStep(UNetInpaintSetTimestepsStep):
    model_name = "stable-diffusion-xl"
    # diffusers' SDXL inpainting default: just below 1, so the first timestep is skipped and
    # the starting latents are the image's, noised, rather than pure noise.
    default_strength = 0.9999


def size_pair(value: Any, name: str, owner: str) -> tuple[int, int]:
    """A (height, width) or (top, left) pair of non-negative integers, or a clear error."""
    if (isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        return int(value[0]), int(value[1])
    raise InvalidInput(f"{owner}: {name} must be a pair of non-negative integers "
                       f"(height, width) or (top, left), got {value!r}", name)


class StableDiffusionXLPrepareAdditionalConditioningStep(ModularPipelineBlocks):
    model_name = "stable-diffusion-xl"
    description = (
        "Builds SDXL's micro-conditioning time ids (original size, crop top-left, target size) "
        "for the images and for the negative conditioning."
    )
    expected_components = [unet_spec()]
    inputs = [
        InputParam("height", int, required=True, description="Output height in pixels."),
        InputParam("width", int, required=True, description="Output width in pixels."),
        InputParam("original_size", tuple,
                   description="(height, width) the UNet is told the source image had; the "
                               "output size by default."),
        InputParam("crops_coords_top_left", tuple, default=(0, 0),
                   description="(top, left) the UNet is told the image was cropped at."),
        InputParam("target_size", tuple,
                   description="(height, width) of the intended output; the output size by "
                               "default."),
        InputParam("negative_original_size", tuple,
                   description="original_size for the negative conditioning; original_size by "
                               "default."),
        InputParam("negative_crops_coords_top_left", tuple,
                   description="crops_coords_top_left for the negative conditioning; "
                               "crops_coords_top_left by default."),
        InputParam("negative_target_size", tuple,
                   description="target_size for the negative conditioning; target_size by "
                               "default."),
        InputParam("batch_size", int, required=True),
        InputParam("prompt_embeds", torch.Tensor, required=True,
                   description="Text embeddings; the time ids take their dtype."),
        InputParam("pooled_prompt_embeds", torch.Tensor, required=True,
                   description="(B, Dp) pooled text embeddings (their width is checked "
                               "against the UNet's added embedding)."),
    ]
    intermediate_outputs = [
        OutputParam("add_time_ids", torch.Tensor, "(B, 6) micro-conditioning of the images.",
                    kwargs_type="denoiser_input_fields"),
        OutputParam("negative_add_time_ids", torch.Tensor,
                    "(B, 6) micro-conditioning of the negative conditioning.",
                    kwargs_type="denoiser_input_fields"),
    ]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        path = self.path
        output_size = (block_state.height, block_state.width)
        original = size_pair(block_state.original_size or output_size, "original_size", path)
        crop = size_pair(block_state.crops_coords_top_left, "crops_coords_top_left", path)
        target = size_pair(block_state.target_size or output_size, "target_size", path)
        negative = (
            size_pair(block_state.negative_original_size or original,
                      "negative_original_size", path),
            size_pair(block_state.negative_crops_coords_top_left or crop,
                      "negative_crops_coords_top_left", path),
            size_pair(block_state.negative_target_size or target, "negative_target_size", path),
        )
        self._check_embedding_width(components.unet, block_state.pooled_prompt_embeds.shape[-1])
        dtype, device = block_state.prompt_embeds.dtype, block_state.prompt_embeds.device
        rows = block_state.batch_size

        def time_ids(pairs: tuple[tuple[int, int], ...]) -> torch.Tensor:
            values = [v for pair in pairs for v in pair]
            return torch.tensor([values], dtype=dtype).to(device).repeat(rows, 1)

        block_state.add_time_ids = time_ids((original, crop, target))
        block_state.negative_add_time_ids = time_ids(negative)
        self.set_block_state(state, block_state)
        return components, state

    def _check_embedding_width(self, unet: Any, pooled_width: int) -> None:
        """The UNet's added embedding must take 6 time ids and the pooled embedding."""
        config = unet.config
        if config.addition_embed_type != "text_time":
            raise ValueError(f"{self.path}: the UNet has no SDXL added conditioning "
                             f"(addition_embed_type {config.addition_embed_type!r})")
        passed = config.addition_time_embed_dim * 6 + pooled_width
        expected = unet.add_embedding.linear_1.in_features
        if passed != expected:
            raise ValueError(
                f"{self.path}: the UNet's added embedding takes {expected} values, but 6 time "
                f"ids and {pooled_width}-wide pooled embeddings make {passed} (a refiner UNet "
                "conditioned on an aesthetic score is not supported)"
            )
