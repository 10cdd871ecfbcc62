"""The denoise loops of UNet latent-diffusion pipelines (Stable Diffusion 1.x/2.x, SDXL): per
timestep, prepare the UNet input, predict the noise (with classifier-free guidance), and step
the scheduler.

With guidance the UNet runs once on a batch of [unconditional, conditional] inputs, as in
diffusers, and the prediction is `uncond + scale * (cond - uncond)`, optionally rescaled
(`guidance_rescale`). UNets with added conditioning (SDXL's "text_time" embedding: pooled text
embeddings and micro-conditioning time ids) get it batched the same way, negative first.
Inpainting adds two things: 9-channel inpaint UNets see the mask and the masked image latents
next to the latents; 4-channel UNets keep the unmasked region by blending the (re-noised) image
latents back in after every step. The scheduler step passes `eta` and the generator to
schedulers that take them (DDIM, ancestral, LCM), like diffusers' `prepare_extra_step_kwargs`.
Progress, step callbacks and cancellation come from the framework's loop. The UNet call is a
`blocks.stepping.StepForward`: a server can run one step of several requests (different step
counts, guidance scales, timesteps; text-to-image, image-to-image and 4-channel inpainting
alike) as one UNet call.

Not handled here: the ControlNet variant of the denoiser (`blocks.unet_controlnet`; it is not
shared: each request's ControlNet residuals are scaled by its own schedule, so its requests
step alone); IP-Adapter image embeddings.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from blocks.block import ModularPipelineBlocks
from blocks.composites import LoopSequentialPipelineBlocks
from blocks.specs import InputParam, OutputParam
from blocks.stepping import ForwardBatch, ForwardRows, StepForward
from blocks.unet_latents import scheduler_spec, unet_spec


def uses_guidance(unet: Any, guidance_scale: float) -> bool:
    """Classifier-free guidance runs when `guidance_scale > 1`, except for UNets distilled with
    the guidance scale as an input (`time_cond_proj_dim`, e.g. LCM): they get it embedded."""
    return guidance_scale > 1 and unet.config.time_cond_proj_dim is None


def guided_embeddings(unet: Any, block_state: Any, owner: str) -> torch.Tensor:
    """The UNet's text conditioning: [negative, positive] with guidance, else positive."""
    if not uses_guidance(unet, block_state.guidance_scale):
        return block_state.prompt_embeds
    if block_state.negative_prompt_embeds is None:
        raise ValueError(f"{owner}: guidance_scale {block_state.guidance_scale} needs "
                         "negative_prompt_embeds (the text encoder makes them when > 1)")
    return torch.cat([block_state.negative_prompt_embeds, block_state.prompt_embeds])


def guided_added_conditioning(
    unet: Any, block_state: Any, owner: str
) -> dict[str, torch.Tensor] | None:
    """The UNet's `added_cond_kwargs` ("text_time" UNets such as SDXL's): pooled text
    embeddings and time ids, [negative, positive] with guidance; None for other UNets."""
    if block_state.pooled_prompt_embeds is None:
        return None
    text_embeds, time_ids = block_state.pooled_prompt_embeds, block_state.add_time_ids
    if time_ids is None:
        raise ValueError(f"{owner}: pooled_prompt_embeds need add_time_ids")
    if uses_guidance(unet, block_state.guidance_scale):
        negative_embeds = block_state.negative_pooled_prompt_embeds
        negative_ids = block_state.negative_add_time_ids
        if negative_embeds is None or negative_ids is None:
            raise ValueError(f"{owner}: guidance_scale {block_state.guidance_scale} needs "
                             "negative_pooled_prompt_embeds and negative_add_time_ids")
        text_embeds = torch.cat([negative_embeds, text_embeds])
        time_ids = torch.cat([negative_ids, time_ids])
    return {"text_embeds": text_embeds, "time_ids": time_ids}


def rescale_noise_cfg(
    noise_cfg: torch.Tensor, noise_pred_text: torch.Tensor, guidance_rescale: float
) -> torch.Tensor:
    """Rescale a guided prediction towards the conditional one's std (arXiv:2305.08891, 3.4),
    against the over-exposure strong guidance causes with zero-terminal-SNR schedules."""
    dims = list(range(1, noise_pred_text.ndim))
    std_text = noise_pred_text.std(dim=dims, keepdim=True)
    std_cfg = noise_cfg.std(dim=dims, keepdim=True)
    rescaled = noise_cfg * (std_text / std_cfg)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * noise_cfg


def apply_guidance(noise_pred: torch.Tensor, block_state: Any) -> torch.Tensor:
    """(2B, ...) [uncond, cond] predictions -> (B, ...) guided prediction."""
    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
    guided = noise_pred_uncond + block_state.guidance_scale * (noise_pred_text - noise_pred_uncond)
    if block_state.guidance_rescale > 0.0:
        guided = rescale_noise_cfg(guided, noise_pred_text, block_state.guidance_rescale)
    return guided


GUIDANCE_INPUTS = [
    InputParam("prompt_embeds", torch.Tensor, required=True, description="(B, L, D)."),
    InputParam("negative_prompt_embeds", torch.Tensor, description="(B, L, D); for guidance."),
    InputParam("pooled_prompt_embeds", torch.Tensor,
               description="(B, P) pooled text embeddings of UNets with added conditioning."),
    InputParam("negative_pooled_prompt_embeds", torch.Tensor, description="(B, P); for guidance."),
    InputParam("add_time_ids", torch.Tensor,
               description="(B, K) micro-conditioning of UNets with added conditioning."),
    InputParam("negative_add_time_ids", torch.Tensor, description="(B, K); for guidance."),
    InputParam("guidance_scale", float, required=True,
               description="From the text encoder step (which has the family's default)."),
    InputParam("guidance_rescale", float, default=0.0,
               description="0..1; rescales the guided prediction's std (0 = off)."),
    InputParam("timestep_cond", torch.Tensor,
               description="Guidance embedding of guidance-distilled UNets."),
    InputParam("cross_attention_kwargs", dict,
               description="Passed to the UNet's attention processors."),
]


class UNetLoopBeforeDenoiser(ModularPipelineBlocks):
    description = "Doubles the latents for guidance and scales them for the scheduler."
    expected_components = [unet_spec(), scheduler_spec()]
    inputs = [
        InputParam("latents", torch.Tensor, required=True, description="(B, c, h, w)."),
        InputParam("guidance_scale", float, required=True),
    ]
    intermediate_outputs = [
        OutputParam("latent_model_input", torch.Tensor, "(B or 2B, c, h, w) UNet input."),
    ]

    def __call__(self, components, block_state, i: int, t: torch.Tensor):
        latents = block_state.latents
        if uses_guidance(components.unet, block_state.guidance_scale):
            latents = torch.cat([latents] * 2)
        block_state.latent_model_input = components.scheduler.scale_model_input(latents, t)
        return components, block_state


class UNetInpaintLoopBeforeDenoiser(UNetLoopBeforeDenoiser):
    description = (
        "As the plain one; 9-channel inpaint UNets also get the mask and the masked image "
        "latents next to the (scaled) latents."
    )
    inputs = [
        *UNetLoopBeforeDenoiser.inputs,
        InputParam("latent_mask", torch.Tensor, required=True, description="(B, 1, h, w)."),
        InputParam("masked_image_latents", torch.Tensor, required=True,
                   description="(B, c, h, w)."),
    ]

    def __call__(self, components, block_state, i: int, t: torch.Tensor):
        components, block_state = super().__call__(components, block_state, i, t)
        if components.unet.config.in_channels == 9:
            mask, masked = block_state.latent_mask, block_state.masked_image_latents
            if uses_guidance(components.unet, block_state.guidance_scale):
                mask, masked = torch.cat([mask] * 2), torch.cat([masked] * 2)
            block_state.latent_model_input = torch.cat(
                [block_state.latent_model_input, mask, masked], dim=1
            )  # (B, 9, h, w)
        return components, block_state


class UNetLoopDenoiser(StepForward):
    description = "Predicts the noise with the UNet and applies classifier-free guidance."
    expected_components = [unet_spec()]
    inputs = [
        InputParam("latent_model_input", torch.Tensor, required=True),
        *GUIDANCE_INPUTS,
    ]
    intermediate_outputs = [OutputParam("noise_pred", torch.Tensor, "(B, c, h, w).")]

    # One UNet call per step: with guidance its rows are [unconditional, conditional], as in
    # diffusers. Requests share the call when their rows fit together (same UNet, latent,
    # embedding and added-conditioning shapes; no attention kwargs, which apply to the whole
    # call). Added conditioning (pooled embeddings, time ids) is per row: concatenated too.
    def forward_rows(self, components, block_state, i: int, t: torch.Tensor):
        unet = components.unet
        sample = block_state.latent_model_input  # (R, c, h, w)
        rows = sample.shape[0]
        inputs = {
            "sample": sample,
            "timestep": torch.as_tensor(t, device=sample.device).reshape(1).expand(rows),
            "encoder_hidden_states": guided_embeddings(unet, block_state, self.path),
        }
        if block_state.timestep_cond is not None:
            inputs["timestep_cond"] = block_state.timestep_cond
        added = guided_added_conditioning(unet, block_state, self.path)
        if added is not None:
            inputs.update(added)
        kwargs = block_state.cross_attention_kwargs
        key = (type(self), id(unet), tuple(sample.shape[1:]), sample.dtype,
               tuple(inputs["encoder_hidden_states"].shape[1:]), "timestep_cond" in inputs,
               None if added is None else tuple(tuple(v.shape[1:]) for v in added.values()),
               None if kwargs is None else id(block_state))  # kwargs: never shared
        return [ForwardRows(key, inputs, {"cross_attention_kwargs": kwargs})]

    def forward(self, components, batch: ForwardBatch) -> torch.Tensor:
        inputs = batch.inputs
        added = ({"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
                 if "text_embeds" in inputs else None)
        return components.unet(
            inputs["sample"],
            inputs["timestep"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
            timestep_cond=inputs.get("timestep_cond"),
            cross_attention_kwargs=batch.options["cross_attention_kwargs"],
            added_cond_kwargs=added,
            return_dict=False,
        )[0]

    def take_outputs(self, components, block_state, outputs, i: int, t: torch.Tensor) -> None:
        noise_pred = outputs[0]
        if uses_guidance(components.unet, block_state.guidance_scale):
            noise_pred = apply_guidance(noise_pred, block_state)
        block_state.noise_pred = noise_pred


def extra_step_kwargs(scheduler: Any, generator: Any, eta: float) -> dict[str, Any]:
    """`eta` and `generator` for the schedulers whose `step` takes them."""
    accepted = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, Any] = {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    if "generator" in accepted:
        kwargs["generator"] = generator
    return kwargs


class UNetLoopAfterDenoiser(ModularPipelineBlocks):
    description = "Advances the latents by one scheduler step."
    expected_components = [scheduler_spec()]
    inputs = [
        InputParam("noise_pred", torch.Tensor, required=True),
        InputParam("latents", torch.Tensor, required=True),
        InputParam("generator", description="For schedulers that add noise while stepping."),
        InputParam("eta", float, default=0.0, description="DDIM's eta (0 = deterministic)."),
    ]
    intermediate_outputs = [
        OutputParam("latents", torch.Tensor, "(B, c, h, w) less noisy."),
        OutputParam("denoised", torch.Tensor, "(B, c, h, w) the scheduler's estimate of the "
                    "clean latents at this step, for previews; None where it gives none."),
    ]

    def __call__(self, components, block_state, i: int, t: torch.Tensor):
        scheduler = components.scheduler
        kwargs = extra_step_kwargs(scheduler, block_state.generator, block_state.eta)
        output = scheduler.step(block_state.noise_pred, t, block_state.latents, **kwargs)
        block_state.latents = output.prev_sample
        # DDIM and Euler name it pred_original_sample, LCM denoised; DPM-Solver++ gives none.
        block_state.denoised = getattr(output, "pred_original_sample",
                                       getattr(output, "denoised", None))
        return components, block_state


class UNetInpaintLoopAfterDenoiser(UNetLoopAfterDenoiser):
    description = (
        "Steps the scheduler; for 4-channel UNets then puts the unmasked region back: the "
        "image latents noised to the next timestep (clean after the last step)."
    )
    expected_components = [unet_spec(), scheduler_spec()]
    inputs = [
        *UNetLoopAfterDenoiser.inputs,
        InputParam("timesteps", torch.Tensor, required=True),
        InputParam("latent_mask", torch.Tensor, required=True, description="(B, 1, h, w)."),
        InputParam("image_latents", torch.Tensor, description="(B, c, h, w); 4-channel UNets."),
        InputParam("noise", torch.Tensor, description="(B, c, h, w) the starting noise."),
    ]

    def __call__(self, components, block_state, i: int, t: torch.Tensor):
        components, block_state = super().__call__(components, block_state, i, t)
        if components.unet.config.in_channels != 4:
            return components, block_state
        image_latents = block_state.image_latents
        timesteps = block_state.timesteps
        if i < len(timesteps) - 1:
            image_latents = components.scheduler.add_noise(
                image_latents, block_state.noise, timesteps[i + 1 : i + 2]
            )
        mask = block_state.latent_mask
        block_state.latents = (1 - mask) * image_latents + mask * block_state.latents
        if block_state.denoised is not None:  # the kept region, clean
            block_state.denoised = ((1 - mask) * block_state.image_latents
                                    + mask * block_state.denoised)
        return components, block_state


class UNetDenoiseLoop(LoopSequentialPipelineBlocks):
    description = "Denoises the latents: UNet input, guided noise prediction, scheduler step."
    loop_inputs = [
        InputParam("timesteps", torch.Tensor, required=True, description="From set_timesteps."),
    ]
    loop_intermediate_outputs = [OutputParam("latents", torch.Tensor, "(B, c, h, w) denoised.")]
    block_classes = [
        UNetLoopBeforeDenoiser,
        UNetLoopDenoiser,
        UNetLoopAfterDenoiser,
    ]
    block_names = ["before_denoiser", "denoiser", "after_denoiser"]


class UNetInpaintDenoiseLoop(UNetDenoiseLoop):
    description = "Denoises the latents of an inpainting: the plain loop plus mask handling."
    block_classes = [
        UNetInpaintLoopBeforeDenoiser,
        UNetLoopDenoiser,
        UNetInpaintLoopAfterDenoiser,
    ]
