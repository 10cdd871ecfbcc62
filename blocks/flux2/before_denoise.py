"""FLUX.2 [klein] steps between encoding and the denoise loop: noise, ids and timesteps.

The starting noise is drawn directly in the transformer's patchified shape (B, 4c, h, w) with
h, w = height / 16, width / 16, then packed to (B, h*w, 4c). The timesteps are the sigmas
linspace(1, 1/N, N) shifted by an empirical, resolution- and step-dependent `mu`. Reference
image latents from the VAE encoder are packed, given their own position ids and repeated to
the batch. The generator is used for the starting noise only.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

from blocks.block import ModularPipelineBlocks
from blocks.errors import InvalidInput
from blocks.flux2 import latent_layout
from blocks.randomness import randn
from blocks.specs import ComponentSpec, InputParam, OutputParam

logger = logging.getLogger(__name__)

DEFAULT_NUM_INFERENCE_STEPS = 4  # what the step-distilled models are made for
DEFAULT_SAMPLE_SIZE = 128  # latents a side by default: 128 * 8 = 1024 px

# FLUX.2's scheduler (the one place it is written down): exponential shifting by the `mu` the
# pipeline passes. Used when no checkpoint provides `scheduler/scheduler_config.json`, and by
# the tiny checkpoint. The klein pipeline passes explicit sigmas = linspace(1, 1/N, N) plus mu
# from `compute_empirical_mu`, so with dynamic shifting the scheduler applies
# exp(mu) / (exp(mu) + (1/sigma - 1)); base/max shift and the seq-len bounds are unused there
# but kept at FLUX's values for callers that compute mu the FLUX.1 way.
FLUX2_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "time_shift_type": "exponential",
}
SCHEDULER_SPEC = ComponentSpec(
    "scheduler", FlowMatchEulerDiscreteScheduler, "Flow-matching Euler sampler.",
    config=FLUX2_SCHEDULER_CONFIG, default_creation_method="from_config",
)


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's timestep shift: linear in the number of image tokens, interpolated between
    fits made at 10 and 200 steps (and the 200-step fit alone for very large images)."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    mu_200 = a2 * image_seq_len + b2
    mu_10 = a1 * image_seq_len + b1
    slope = (mu_200 - mu_10) / 190.0
    intercept = mu_200 - 200.0 * slope
    return float(slope * num_steps + intercept)


class Flux2KleinPrepareLatentsStep(ModularPipelineBlocks):
    model_name = "flux2-klein"
    description = "Draws the starting noise as packed tokens and makes their position ids."
    expected_components = [
        ComponentSpec("transformer", Flux2Transformer2DModel, "FLUX.2's flow transformer."),
    ]
    inputs = [
        InputParam("batch_size", int, required=True, description="Number of images."),
        InputParam("prompt_embeds", torch.Tensor, required=True,
                   description="Text embeddings; the noise takes their dtype."),
        InputParam("height", int, description="Image height, a multiple of 16 px; 1024 if unset."),
        InputParam("width", int, description="Image width, a multiple of 16 px; 1024 if unset."),
        InputParam("generator", description="A torch.Generator, or one per image."),
        InputParam("latents", torch.Tensor,
                   description="Starting noise (B, 4c, h, w) to use instead of drawing it."),
    ]
    intermediate_outputs = [
        OutputParam("latents", torch.Tensor, "(B, h*w, 4c) packed noisy latents."),
        OutputParam("latent_ids", torch.Tensor, "(B, h*w, 4) their position ids."),
    ]

    def _latent_size(self, components: Any, height: int | None, width: int | None):
        """(h, w) of the token grid; sizes not a multiple of 16 px are rounded down."""
        vae_scale = latent_layout.vae_scale_factor(components)
        multiple_of = vae_scale * 2
        height = height or DEFAULT_SAMPLE_SIZE * vae_scale
        width = width or DEFAULT_SAMPLE_SIZE * vae_scale
        if height % multiple_of or width % multiple_of:
            logger.warning("%s: height and width should be multiples of %d, got %dx%d; "
                           "rounding down", self.path, multiple_of, height, width)
        if height < multiple_of or width < multiple_of:
            raise InvalidInput(f"{self.path}: height and width must be at least {multiple_of} px, "
                               f"got {height}x{width}", "height")
        return int(height) // multiple_of, int(width) // multiple_of

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        device = components._execution_device
        dtype = block_state.prompt_embeds.dtype
        batch_size = block_state.batch_size
        height, width = self._latent_size(components, block_state.height, block_state.width)
        channels = components.transformer.config.in_channels
        if block_state.latents is None:
            noise = randn(
                (batch_size, channels, height, width), block_state.generator, device, dtype
            )
        else:
            noise = block_state.latents.to(device=device, dtype=dtype)
            if noise.shape != (batch_size, channels, height, width):
                raise InvalidInput(f"{self.path}: latents have shape {tuple(noise.shape)}; "
                                   f"expected {(batch_size, channels, height, width)}", "latents")
        block_state.latent_ids = latent_layout.latent_ids(batch_size, height, width, device)
        block_state.latents = latent_layout.pack(noise)
        self.set_block_state(state, block_state)
        return components, state


class Flux2KleinPrepareImageLatentsStep(ModularPipelineBlocks):
    model_name = "flux2-klein"
    description = (
        "Packs the reference image latents into one token sequence with their position ids, "
        "repeated for every image in the batch."
    )
    inputs = [
        InputParam("image_latents", list, required=True,
                   description="(1, 4c, h, w) normalised latents per reference image."),
        InputParam("batch_size", int, required=True),
    ]
    intermediate_outputs = [
        OutputParam("condition_latents", torch.Tensor, "(B, S, 4c) reference image tokens."),
        OutputParam("condition_ids", torch.Tensor, "(B, S, 4) their position ids."),
    ]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        device = components._execution_device
        latents = block_state.image_latents
        ids = latent_layout.reference_ids([tuple(x.shape[-2:]) for x in latents])  # (1, S, 4)
        tokens = torch.cat([latent_layout.pack(x) for x in latents], dim=1)  # (1, S, 4c)
        batch_size = block_state.batch_size
        block_state.condition_latents = tokens.repeat(batch_size, 1, 1).to(device)
        block_state.condition_ids = ids.repeat(batch_size, 1, 1).to(device)
        self.set_block_state(state, block_state)
        return components, state


class Flux2KleinSetTimestepsStep(ModularPipelineBlocks):
    model_name = "flux2-klein"
    description = "Sets the scheduler's sigmas, shifted for the image size and step count."
    expected_components = [SCHEDULER_SPEC]
    inputs = [
        InputParam("num_inference_steps", int, default=DEFAULT_NUM_INFERENCE_STEPS,
                   description="Denoising steps; 4 suits the distilled models, ~50 the base."),
        InputParam("sigmas", list, description="Custom sigmas instead of linspace(1, 1/N, N)."),
        InputParam("latents", torch.Tensor, required=True,
                   description="(B, S, C) packed latents; S sets the timestep shift."),
    ]
    intermediate_outputs = [
        OutputParam("timesteps", torch.Tensor, "The scheduler's timesteps, one per step."),
        OutputParam("num_inference_steps", int, "Number of steps actually scheduled."),
    ]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        scheduler = components.scheduler
        steps = block_state.num_inference_steps
        if steps < 1:
            raise InvalidInput(f"{self.path}: num_inference_steps must be >= 1, got {steps}",
                               "num_inference_steps")
        sigmas = block_state.sigmas
        if sigmas is None:
            sigmas = np.linspace(1.0, 1 / steps, steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None  # such schedulers make their own
        mu = compute_empirical_mu(image_seq_len=block_state.latents.shape[1], num_steps=steps)
        device = components._execution_device
        if sigmas is None:
            scheduler.set_timesteps(steps, device=device, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        block_state.timesteps = scheduler.timesteps
        block_state.num_inference_steps = len(scheduler.timesteps)
        self.set_block_state(state, block_state)
        return components, state
