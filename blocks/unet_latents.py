"""The steps of UNet latent-diffusion pipelines (Stable Diffusion 1.x/2.x, SDXL) between
encoding and the denoise loop: timesteps, starting latents, inpainting masks and the guidance
embedding of guidance-distilled UNets.

Every random draw of a generation happens here, in the order diffusers' pipelines make them,
so that one seed gives the reference pipeline's image:

- text-to-image:  noise;
- image-to-image: the image's VAE posterior sample, then noise;
- inpainting:     the image's posterior sample (4-channel UNets, or strength < 1), noise,
                  then the masked image's posterior sample (drawn even where a 4-channel UNet
                  won't use it, because ancestral schedulers draw from the same generator).

A list of generators gives every image its own, so an image never depends on its batch.
(diffusers' inpainting pipelines sample the VAE posteriors of a single input image with the
first generator only; here image i always uses generator i, which is what diffusers gives
for that image made alone.) The schedulers are used only through their generic interface:
`set_timesteps`, `order`, `set_begin_index`, `init_noise_sigma` and `add_noise`.

Not handled here: family defaults other than diffusers' SD ones (a family subclasses the
timestep steps to change `default_strength`), `denoising_start` / `denoising_end`.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

from blocks.block import ModularPipelineBlocks
from blocks.errors import InvalidInput
from blocks.randomness import Generator, randn
from blocks.specs import ComponentSpec, InputParam, OutputParam
from blocks.unet_vae import check_size, default_size, vae_scale_factor, vae_scaling_factor

DEFAULT_NUM_INFERENCE_STEPS = 50

# SD 1.x/2.x's and SDXL's noise schedule, for pipelines made without a checkpoint's scheduler
# config.
DEFAULT_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 1,
}


def scheduler_spec() -> ComponentSpec:
    return ComponentSpec(
        "scheduler", EulerDiscreteScheduler,
        "Any diffusers scheduler; swap with update_components(scheduler=...).",
        config=DEFAULT_SCHEDULER_CONFIG, default_creation_method="from_config",
    )


def unet_spec() -> ComponentSpec:
    return ComponentSpec("unet", UNet2DConditionModel, "The noise-predicting UNet.")


# -- randomness --------------------------------------------------------------------------------


def single_generator(generator: Generator, batch_size: int, owner: str) -> Generator:
    """Checks a generator list against the batch; a list of one is that one generator."""
    if isinstance(generator, list):
        if len(generator) == 1:
            return generator[0]
        if len(generator) != batch_size:
            raise InvalidInput(f"{owner}: got {len(generator)} generators for a batch of "
                               f"{batch_size} images; pass one generator, or one per image",
                               "generator")
    return generator


def sample_posterior(posterior: torch.Tensor, generator: Generator) -> torch.Tensor:
    """A sample of the VAE posterior (B, 2c, h, w): mean + std * noise, as diffusers'
    `DiagonalGaussianDistribution.sample`."""
    mean, logvar = torch.chunk(posterior, 2, dim=1)
    std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
    return mean + std * randn(mean.shape, generator, posterior.device, posterior.dtype)


def image_index(num_images: int, batch_size: int, num_images_per_prompt: int, owner: str):
    """Which of the `num_images` input images each image of the batch starts from: one image
    for all, one per image, or one per prompt (repeated for the prompt's images)."""
    if num_images == 1:
        return [0] * batch_size
    if num_images == batch_size:
        return list(range(batch_size))
    if num_images * num_images_per_prompt == batch_size:
        return [i // num_images_per_prompt for i in range(batch_size)]
    raise InvalidInput(f"{owner}: got {num_images} images for {batch_size} outputs; pass one "
                       "image, one per prompt, or one per output image", "image")


def sample_image_latents(
    posterior: torch.Tensor,
    generator: Generator,
    batch_size: int,
    num_images_per_prompt: int,
    scaling_factor: float,
    owner: str,
) -> torch.Tensor:
    """(K, 2c, h, w) posteriors of K input images -> (B, c, h, w) scaled latent samples.

    One generator samples the K images once, as diffusers does, and the samples are repeated
    to the batch; a list samples image i with generator i.
    """
    index = image_index(posterior.shape[0], batch_size, num_images_per_prompt, owner)
    if isinstance(generator, list):
        samples = torch.cat([
            sample_posterior(posterior[j : j + 1], g) for j, g in zip(index, generator, strict=True)
        ])
        return scaling_factor * samples
    samples = scaling_factor * sample_posterior(posterior, generator)
    if samples.shape[0] == batch_size:
        return samples
    return torch.cat([samples[j : j + 1] for j in index])


# -- timesteps ---------------------------------------------------------------------------------


def set_scheduler_timesteps(
    scheduler: Any,
    num_inference_steps: int,
    device: torch.device,
    timesteps: list[int] | None,
    sigmas: list[float] | None,
    owner: str,
) -> tuple[torch.Tensor, int]:
    """Set the scheduler's schedule: `num_inference_steps` spaced by its config, or custom
    `timesteps` or `sigmas` where the scheduler takes them."""
    if timesteps is not None and sigmas is not None:
        raise InvalidInput(f"{owner}: pass timesteps or sigmas, not both")
    custom = {"timesteps": timesteps, "sigmas": sigmas}
    custom = {name: value for name, value in custom.items() if value is not None}
    for name in custom:
        if name not in inspect.signature(scheduler.set_timesteps).parameters:
            raise InvalidInput(f"{owner}: {type(scheduler).__name__} does not take custom {name}")
    if custom:
        scheduler.set_timesteps(device=device, **custom)
        return scheduler.timesteps, len(scheduler.timesteps)
    if num_inference_steps < 1:
        raise InvalidInput(f"{owner}: num_inference_steps must be >= 1, got "
                           f"{num_inference_steps}", "num_inference_steps")
    scheduler.set_timesteps(num_inference_steps, device=device)
    return scheduler.timesteps, num_inference_steps


class UNetSetTimestepsStep(ModularPipelineBlocks):
    description = "Sets the scheduler's timesteps."
    expected_components = [scheduler_spec()]
    inputs = [
        InputParam("num_inference_steps", int, default=DEFAULT_NUM_INFERENCE_STEPS),
        InputParam("timesteps", list, description="Custom timesteps, if the scheduler takes them."),
        InputParam("sigmas", list, description="Custom sigmas, if the scheduler takes them."),
    ]
    intermediate_outputs = [
        OutputParam("timesteps", torch.Tensor, "The timesteps to denoise at."),
        OutputParam("num_inference_steps", int, "Number of denoising steps."),
    ]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        block_state.timesteps, block_state.num_inference_steps = set_scheduler_timesteps(
            components.scheduler, block_state.num_inference_steps,
            components._execution_device, block_state.timesteps, block_state.sigmas, self.path,
        )
        self.set_block_state(state, block_state)
        return components, state


class UNetImg2ImgSetTimestepsStep(ModularPipelineBlocks):
    description = (
        "Sets the scheduler's timesteps and skips the first (1 - strength) of them: the "
        "denoising starts from the given image noised to the first remaining timestep."
    )
    expected_components = [scheduler_spec()]
    default_strength = 0.8  # diffusers' SD image-to-image default; a family may set its own
    inputs = [
        InputParam("num_inference_steps", int, default=DEFAULT_NUM_INFERENCE_STEPS),
        InputParam("timesteps", list),
        InputParam("sigmas", list),
        # No declared default: each branch has its own, and a merged contract shows one.
        InputParam("strength", float,
                   description="How much to change the image, 0..1: 0 keeps it, 1 ignores "
                               "it; by default the workflow's (image-to-image and "
                               "inpainting differ, and so do families)."),
        InputParam("batch_size", int, required=True),
    ]
    intermediate_outputs = [
        OutputParam("timesteps", torch.Tensor, "The remaining timesteps to denoise at."),
        OutputParam("num_inference_steps", int, "Number of denoising steps that run."),
        OutputParam("latent_timestep", torch.Tensor, "(B,) timestep the image is noised to."),
        OutputParam("strength", float, "The strength in effect (the default when not given)."),
    ]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        strength = self.default_strength if block_state.strength is None else block_state.strength
        if not 0 <= strength <= 1:
            raise InvalidInput(f"{self.path}: strength must be in [0, 1], got {strength}",
                               "strength")
        scheduler = components.scheduler
        _, steps = set_scheduler_timesteps(
            scheduler, block_state.num_inference_steps, components._execution_device,
            block_state.timesteps, block_state.sigmas, self.path,
        )
        init_steps = min(int(steps * strength), steps)
        t_start = max(steps - init_steps, 0)
        timesteps = scheduler.timesteps[t_start * scheduler.order :]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * scheduler.order)
        if steps - t_start < 1:
            raise InvalidInput(f"{self.path}: strength {strength} with {steps} steps leaves no "
                               "step to run; raise strength or num_inference_steps", "strength")
        block_state.timesteps = timesteps
        block_state.num_inference_steps = steps - t_start
        block_state.latent_timestep = timesteps[:1].repeat(block_state.batch_size)
        block_state.strength = strength
        self.set_block_state(state, block_state)
        return components, state


class UNetInpaintSetTimestepsStep(UNetImg2ImgSetTimestepsStep):
    description = (
        "Sets the scheduler's timesteps for inpainting: the last `strength` of them, as for "
        "image-to-image; at strength 1 all of them, from pure noise."
    )
    default_strength = 1.0  # diffusers' SD inpainting default


# -- latents -----------------------------------------------------------------------------------


class UNetPrepareLatentsStep(ModularPipelineBlocks):
    description = "Draws the starting noise, scaled by the scheduler's initial sigma."
    expected_components = [unet_spec(), scheduler_spec()]
    inputs = [
        InputParam("batch_size", int, required=True),
        InputParam("prompt_embeds", torch.Tensor, required=True,
                   description="Text embeddings; the latents take their dtype."),
        InputParam("height", int, description="Image height in pixels; the UNet's by default."),
        InputParam("width", int, description="Image width in pixels; the UNet's by default."),
        InputParam("generator", description="A torch.Generator, or one per image."),
        InputParam("latents", torch.Tensor,
                   description="Starting noise (B, c, h, w) to use instead of drawing it."),
    ]
    intermediate_outputs = [
        OutputParam("latents", torch.Tensor, "(B, c, h, w) noisy latents."),
        OutputParam("height", int, "Output height in pixels."),
        OutputParam("width", int, "Output width in pixels."),
    ]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        default_height, default_width = default_size(components)
        height = block_state.height or default_height
        width = block_state.width or default_width
        factor = vae_scale_factor(components)
        check_size(height, width, factor, self.path)
        batch_size = block_state.batch_size
        shape = (batch_size, components.unet.config.in_channels, height // factor, width // factor)
        device = components._execution_device
        dtype = block_state.prompt_embeds.dtype
        if block_state.latents is None:
            generator = single_generator(block_state.generator, batch_size, self.path)
            latents = randn(shape, generator, device, dtype)
        else:
            latents = block_state.latents.to(device)
            if tuple(latents.shape) != shape:
                raise InvalidInput(f"{self.path}: latents have shape {tuple(latents.shape)}; "
                                   f"expected {shape}", "latents")
        block_state.latents = latents * components.scheduler.init_noise_sigma
        block_state.height, block_state.width = height, width
        self.set_block_state(state, block_state)
        return components, state


class UNetImg2ImgPrepareLatentsStep(ModularPipelineBlocks):
    description = "Samples the image's VAE posterior and noises it to the first timestep."
    expected_components = [scheduler_spec()]
    inputs = [
        InputParam("image_posterior", torch.Tensor, required=True,
                   description="(K, 2c, h, w) VAE posteriors of the input images."),
        InputParam("latent_timestep", torch.Tensor, required=True),
        InputParam("batch_size", int, required=True),
        InputParam("num_images_per_prompt", int, default=1),
        InputParam("prompt_embeds", torch.Tensor, required=True,
                   description="Text embeddings; the noise takes their dtype."),
        InputParam("generator", description="A torch.Generator, or one per image."),
    ]
    intermediate_outputs = [OutputParam("latents", torch.Tensor, "(B, c, h, w) noisy latents.")]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        batch_size = block_state.batch_size
        generator = single_generator(block_state.generator, batch_size, self.path)
        device, dtype = components._execution_device, block_state.prompt_embeds.dtype
        # In the denoiser's dtype, which may not be the VAE's (e.g. a float32 VAE beside a
        # float16 UNet), as for inpainting.
        image_latents = sample_image_latents(
            block_state.image_posterior.to(device=device, dtype=dtype), generator, batch_size,
            block_state.num_images_per_prompt, vae_scaling_factor(components, self.path), self.path,
        )
        noise = randn(image_latents.shape, generator, device, dtype)
        block_state.latents = components.scheduler.add_noise(
            image_latents, noise, block_state.latent_timestep
        )
        self.set_block_state(state, block_state)
        return components, state


class UNetInpaintPrepareLatentsStep(ModularPipelineBlocks):
    description = (
        "Starts from noise at strength 1, else from the image noised to the first timestep; "
        "keeps the noise and (for 4-channel UNets) the image latents for blending."
    )
    expected_components = [unet_spec(), scheduler_spec()]
    inputs = [
        InputParam("image_posterior", torch.Tensor, required=True,
                   description="(K, 2c, h, w) VAE posteriors of the input images."),
        InputParam("latent_timestep", torch.Tensor, required=True),
        InputParam("strength", float, required=True, description="From set_timesteps."),
        InputParam("batch_size", int, required=True),
        InputParam("num_images_per_prompt", int, default=1),
        InputParam("prompt_embeds", torch.Tensor, required=True),
        InputParam("generator", description="A torch.Generator, or one per image."),
    ]
    intermediate_outputs = [
        OutputParam("latents", torch.Tensor, "(B, c, h, w) noisy latents."),
        OutputParam("noise", torch.Tensor, "(B, c, h, w) the noise they were made with."),
        OutputParam("image_latents", torch.Tensor,
                    "(B, c, h, w) image latents; None for 9-channel UNets at strength 1."),
    ]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        batch_size = block_state.batch_size
        generator = single_generator(block_state.generator, batch_size, self.path)
        device = components._execution_device
        dtype = block_state.prompt_embeds.dtype
        posterior = block_state.image_posterior.to(device)
        full_strength = block_state.strength == 1.0
        image_latents = None
        # A 4-channel UNet blends the image back in every step; a 9-channel one only needs
        # the image latents as a starting point below full strength.
        if components.unet.config.in_channels == 4 or not full_strength:
            image_latents = sample_image_latents(
                posterior.to(dtype), generator, batch_size, block_state.num_images_per_prompt,
                vae_scaling_factor(components, self.path), self.path,
            ).contiguous()
        shape = (batch_size, posterior.shape[1] // 2, *posterior.shape[-2:])
        noise = randn(shape, generator, device, dtype)
        if full_strength:
            latents = noise * components.scheduler.init_noise_sigma
        else:
            latents = components.scheduler.add_noise(
                image_latents, noise, block_state.latent_timestep
            )
        block_state.latents, block_state.noise = latents, noise
        block_state.image_latents = image_latents
        self.set_block_state(state, block_state)
        return components, state


class UNetInpaintPrepareMaskLatentsStep(ModularPipelineBlocks):
    description = "Shrinks the mask to latent size and samples the masked image's posterior."
    inputs = [
        InputParam("mask", torch.Tensor, required=True, description="(K, 1, H, W), 1 = repaint."),
        InputParam("masked_image_posterior", torch.Tensor, required=True,
                   description="(K, 2c, h, w) VAE posteriors of the masked images."),
        InputParam("batch_size", int, required=True),
        InputParam("num_images_per_prompt", int, default=1),
        InputParam("prompt_embeds", torch.Tensor, required=True),
        InputParam("generator", description="A torch.Generator, or one per image."),
    ]
    intermediate_outputs = [
        OutputParam("latent_mask", torch.Tensor, "(B, 1, h, w) mask at latent size.",
                    kwargs_type="denoiser_input_fields"),
        OutputParam("masked_image_latents", torch.Tensor, "(B, c, h, w).",
                    kwargs_type="denoiser_input_fields"),
    ]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        batch_size, n = block_state.batch_size, block_state.num_images_per_prompt
        generator = single_generator(block_state.generator, batch_size, self.path)
        device = components._execution_device
        dtype = block_state.prompt_embeds.dtype
        posterior = block_state.masked_image_posterior.to(device=device, dtype=dtype)
        mask = torch.nn.functional.interpolate(block_state.mask, size=posterior.shape[-2:])
        mask = mask.to(device=device, dtype=dtype)
        index = image_index(mask.shape[0], batch_size, n, self.path)
        block_state.latent_mask = mask[index] if mask.shape[0] != batch_size else mask
        scaling_factor = vae_scaling_factor(components, self.path)
        block_state.masked_image_latents = sample_image_latents(
            posterior, generator, batch_size, n, scaling_factor, self.path
        ).contiguous()
        self.set_block_state(state, block_state)
        return components, state


# -- guidance embedding ------------------------------------------------------------------------


def guidance_scale_embedding(
    w: torch.Tensor, embedding_dim: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(B,) guidance scales -> (B, embedding_dim) sinusoidal embeddings (VDM / LCM)."""
    w = w * 1000.0
    half_dim = embedding_dim // 2
    freq = torch.log(torch.tensor(10000.0)) / (half_dim - 1)
    freq = torch.exp(torch.arange(half_dim, dtype=dtype) * -freq)
    emb = w.to(dtype)[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class UNetGuidanceEmbeddingStep(ModularPipelineBlocks):
    description = (
        "For UNets distilled with the guidance scale as an input (time_cond_proj_dim, e.g. "
        "LCM), embeds guidance_scale - 1; None for other UNets."
    )
    expected_components = [unet_spec()]
    inputs = [
        InputParam("guidance_scale", float, required=True,
                   description="From the text encoder step (which has the family's default)."),
        InputParam("batch_size", int, required=True),
        InputParam("latents", torch.Tensor, required=True),
    ]
    intermediate_outputs = [
        OutputParam("timestep_cond", torch.Tensor, "(B, time_cond_proj_dim) or None.",
                    kwargs_type="denoiser_input_fields"),
    ]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        dim = components.unet.config.time_cond_proj_dim
        block_state.timestep_cond = None
        if dim is not None:
            w = torch.tensor(block_state.guidance_scale - 1).repeat(block_state.batch_size)
            block_state.timestep_cond = guidance_scale_embedding(w, dim).to(
                device=block_state.latents.device, dtype=block_state.latents.dtype
            )
        self.set_block_state(state, block_state)
        return components, state
