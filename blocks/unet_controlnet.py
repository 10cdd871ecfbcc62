"""ControlNet for UNet latent-diffusion pipelines (SD 1.x/2.x, SDXL): a control image (edges,
depth, pose...) steers the UNet.

`UNetControlNetInputStep` prepares the control image ([0, 1], RGB, the output size — by
default its own, rounded down to the VAE factor) and the per-step on/off schedule from
`control_guidance_start` / `control_guidance_end`. `UNetControlNetLoopDenoiser` replaces the
plain loop denoiser: each step the ControlNet turns the control image into residuals (scaled by
`controlnet_conditioning_scale`) that are added to the UNet's skip connections; a ControlNet of
a UNet with added conditioning (SDXL's) gets the same pooled embeddings and time ids as the UNet.
`guess_mode` (or a ControlNet trained with global pooling) runs the ControlNet on the
conditional half only.

Not handled here: multi-ControlNet, ControlNet-Union, ControlNet with image-to-image or
inpainting (text-to-image only).
"""

from __future__ import annotations

import torch
from diffusers import ControlNetModel
from PIL import Image

from blocks.block import ModularPipelineBlocks
from blocks.errors import InvalidInput
from blocks.specs import ComponentSpec, InputParam, OutputParam
from blocks.unet_denoise import (
    GUIDANCE_INPUTS,
    UNetDenoiseLoop,
    UNetLoopAfterDenoiser,
    UNetLoopBeforeDenoiser,
    apply_guidance,
    guided_added_conditioning,
    guided_embeddings,
    uses_guidance,
)
from blocks.unet_latents import scheduler_spec, unet_spec
from blocks.unet_vae import check_size, preprocess_images, vae_scale_factor


def controlnet_spec() -> ComponentSpec:
    return ComponentSpec("controlnet", ControlNetModel,
                         "A ControlNet matching the UNet (by default the checkpoint's "
                         "`controlnet/` folder).", subfolder="controlnet")


def controlnet_keep(num_steps: int, start: float, end: float) -> list[float]:
    """1.0 for the steps whose span [i/T, (i+1)/T] lies within [start, end], else 0.0."""
    return [1.0 - float(i / num_steps < start or (i + 1) / num_steps > end)
            for i in range(num_steps)]


class UNetControlNetInputStep(ModularPipelineBlocks):
    description = (
        "Prepares the control image for the ControlNet (its size is the output size unless "
        "height/width are given) and which steps the ControlNet acts on."
    )
    expected_components = [controlnet_spec()]
    inputs = [
        InputParam("control_image", Image.Image | list, required=True,
                   description="The conditioning image(s): one, or one per prompt."),
        InputParam("height", int),
        InputParam("width", int),
        InputParam("batch_size", int, required=True),
        InputParam("num_images_per_prompt", int, default=1),
        InputParam("timesteps", torch.Tensor, required=True),
        InputParam("control_guidance_start", float, default=0.0,
                   description="Fraction of the steps after which the ControlNet starts."),
        InputParam("control_guidance_end", float, default=1.0,
                   description="Fraction of the steps after which it stops."),
        InputParam("guess_mode", bool, default=False,
                   description="Condition only the conditional half of guidance (the "
                               "ControlNet recognises the content without a prompt)."),
    ]
    intermediate_outputs = [
        OutputParam("controlnet_cond", torch.Tensor, "(B, 3, H, W) in [0, 1].",
                    kwargs_type="denoiser_input_fields"),
        OutputParam("controlnet_keep", list, "Per step: 1.0 if the ControlNet acts, else 0.0."),
        OutputParam("guess_mode", bool, "Whether guess mode is on (also by the ControlNet)."),
        OutputParam("height", int, "Output height in pixels."),
        OutputParam("width", int, "Output width in pixels."),
    ]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        start, end = block_state.control_guidance_start, block_state.control_guidance_end
        if not 0.0 <= start < end <= 1.0:
            raise InvalidInput(f"{self.path}: need 0 <= control_guidance_start < "
                               f"control_guidance_end <= 1, got {start} and {end}")
        controlnet = components.controlnet
        factor = vae_scale_factor(components)
        image = preprocess_images(block_state.control_image, block_state.height,
                                  block_state.width, factor)  # (K, 3, H, W) in [0, 1]
        height, width = image.shape[-2:]
        check_size(height, width, factor, self.path)
        batch_size, n = block_state.batch_size, block_state.num_images_per_prompt
        if image.shape[0] == 1:
            repeat_by = batch_size
        elif image.shape[0] * n == batch_size:
            repeat_by = n
        else:
            raise InvalidInput(f"{self.path}: got {image.shape[0]} control images for "
                               f"{batch_size // n} prompts; pass one, or one per prompt",
                               "control_image")
        image = image.repeat_interleave(repeat_by, dim=0)
        block_state.controlnet_cond = image.to(components._execution_device, controlnet.dtype)
        block_state.controlnet_keep = controlnet_keep(len(block_state.timesteps), start, end)
        block_state.guess_mode = bool(
            block_state.guess_mode or controlnet.config.global_pool_conditions
        )
        block_state.height, block_state.width = height, width
        self.set_block_state(state, block_state)
        return components, state


class UNetControlNetLoopDenoiser(ModularPipelineBlocks):
    description = (
        "Runs the ControlNet on the control image, then the UNet with its residuals, and "
        "applies classifier-free guidance."
    )
    expected_components = [unet_spec(), controlnet_spec(), scheduler_spec()]
    inputs = [
        InputParam("latent_model_input", torch.Tensor, required=True),
        InputParam("latents", torch.Tensor, required=True),
        *GUIDANCE_INPUTS,
        InputParam("controlnet_cond", torch.Tensor, required=True),
        InputParam("controlnet_keep", list, required=True),
        InputParam("guess_mode", bool, default=False),
        InputParam("controlnet_conditioning_scale", float, default=1.0,
                   description="Strength of the ControlNet residuals."),
    ]
    intermediate_outputs = [OutputParam("noise_pred", torch.Tensor, "(B, c, h, w).")]

    def __call__(self, components, block_state, i: int, t: torch.Tensor):
        unet, controlnet = components.unet, components.controlnet
        guided = uses_guidance(unet, block_state.guidance_scale)
        embeds = guided_embeddings(unet, block_state, self.path)
        added = guided_added_conditioning(unet, block_state, self.path)
        cond = block_state.controlnet_cond
        if guided and block_state.guess_mode:
            # The ControlNet sees the conditional half only; the unconditional half of the
            # UNet batch gets zero residuals.
            control_input = components.scheduler.scale_model_input(block_state.latents, t)
            control_embeds = embeds.chunk(2)[1]
            control_added = None if added is None else {
                key: value.chunk(2)[1] for key, value in added.items()
            }
        else:
            control_input, control_embeds = block_state.latent_model_input, embeds
            control_added = added
            if guided:
                cond = torch.cat([cond] * 2)
        scale = block_state.controlnet_conditioning_scale * block_state.controlnet_keep[i]
        down_residuals, mid_residual = controlnet(
            control_input,
            t,
            encoder_hidden_states=control_embeds,
            controlnet_cond=cond,
            conditioning_scale=scale,
            guess_mode=block_state.guess_mode,
            added_cond_kwargs=control_added,
            return_dict=False,
        )
        if guided and block_state.guess_mode:
            down_residuals = [torch.cat([torch.zeros_like(d), d]) for d in down_residuals]
            mid_residual = torch.cat([torch.zeros_like(mid_residual), mid_residual])
        noise_pred = unet(
            block_state.latent_model_input,
            t,
            encoder_hidden_states=embeds,
            timestep_cond=block_state.timestep_cond,
            cross_attention_kwargs=block_state.cross_attention_kwargs,
            down_block_additional_residuals=down_residuals,
            mid_block_additional_residual=mid_residual,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
        if guided:
            noise_pred = apply_guidance(noise_pred, block_state)
        block_state.noise_pred = noise_pred
        return components, block_state


class UNetControlNetDenoiseLoop(UNetDenoiseLoop):
    description = "Denoises the latents with ControlNet residuals added to the UNet."
    block_classes = [
        UNetLoopBeforeDenoiser,
        UNetControlNetLoopDenoiser,
        UNetLoopAfterDenoiser,
    ]
