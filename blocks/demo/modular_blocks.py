"""A demo pipeline of pure-tensor blocks: no model weights, runs anywhere in milliseconds.

It exercises every framework feature a real family uses (a from_config scheduler, a
parameter-free "denoiser" module, an auto branch on `image`, a denoise loop with per-step
sub-blocks, workflows) and paints the colour a prompt names, so its output is recognisable.
Used by the unit tests, the service's weight-free `demo` model and `python -m blocks.demo`; it
is not a generative model.
"""

from __future__ import annotations

import hashlib

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image

from blocks.block import ModularPipelineBlocks
from blocks.composites import (
    AutoPipelineBlocks,
    LoopSequentialPipelineBlocks,
    SequentialPipelineBlocks,
)
from blocks.image_processing import check_output_type, postprocess, to_pixels
from blocks.prompts import check_images_per_prompt, prompt_list, repeat_per_prompt
from blocks.randomness import randn
from blocks.specs import ComponentSpec, ConfigSpec, InputParam, OutputParam
from blocks.stepping import ForwardBatch, ForwardRows, StepForward

COLOURS = {
    "red": (0.9, 0.1, 0.1), "green": (0.1, 0.7, 0.2), "blue": (0.1, 0.2, 0.9),
    "yellow": (0.95, 0.85, 0.1), "purple": (0.6, 0.2, 0.7), "orange": (1.0, 0.55, 0.0),
    "white": (0.95, 0.95, 0.95), "black": (0.05, 0.05, 0.05),
}


class DemoDenoiser(torch.nn.Module):
    """Predicts the flow-matching velocity towards a flat colour image (no weights)."""

    def forward(self, latents: torch.Tensor, sigma: torch.Tensor,
                target: torch.Tensor) -> torch.Tensor:
        # (B, 3, H, W), sigma (B,); the clamp keeps a little of the noise so seeds still show.
        return (latents - target) / sigma.clamp(min=0.3).reshape(-1, 1, 1, 1)


def prompt_colour(prompt: str) -> tuple[float, float, float]:
    """The first colour word in the prompt, else a colour derived from its hash."""
    for word in prompt.lower().replace(",", " ").split():
        if word in COLOURS:
            return COLOURS[word]
    digest = hashlib.sha256(prompt.encode()).digest()
    return tuple(b / 255 for b in digest[:3])  # type: ignore[return-value]


class DemoTextEncoderStep(ModularPipelineBlocks):
    description = "Turns each prompt into an RGB target colour in [-1, 1]."
    inputs = [
        InputParam("prompt", str, required=True, description="What to paint, e.g. 'a red sky'."),
        InputParam("num_images_per_prompt", int, default=1),
    ]
    intermediate_outputs = [
        OutputParam("prompt_embeds", torch.Tensor, "Target colours, (B, 3).",
                    kwargs_type="denoiser_input_fields"),
        OutputParam("batch_size", int, "Number of images to make."),
    ]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        prompts = prompt_list(block_state.prompt, self.path)
        n = check_images_per_prompt(block_state.num_images_per_prompt, self.path)
        colours = torch.tensor([prompt_colour(p) for p in prompts]) * 2 - 1  # (P, 3)
        block_state.prompt_embeds = repeat_per_prompt(colours, n)
        block_state.batch_size = block_state.prompt_embeds.shape[0]
        self.set_block_state(state, block_state)
        return components, state


class DemoSetTimestepsStep(ModularPipelineBlocks):
    description = "Sets the scheduler's timesteps."
    expected_components = [
        ComponentSpec("scheduler", FlowMatchEulerDiscreteScheduler,
                      config={"shift": 1.0}, default_creation_method="from_config"),
    ]
    inputs = [InputParam("num_inference_steps", int, default=4)]
    intermediate_outputs = [OutputParam("timesteps", torch.Tensor)]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        components.scheduler.set_timesteps(block_state.num_inference_steps)
        block_state.timesteps = components.scheduler.timesteps
        self.set_block_state(state, block_state)
        return components, state


class DemoPrepareLatentsStep(ModularPipelineBlocks):
    description = "Draws the starting noise, one generator per image if a list is given."
    expected_configs = [ConfigSpec("default_size", 32, "Height and width when not given.")]
    inputs = [
        InputParam("batch_size", int, required=True),
        InputParam("height", int),
        InputParam("width", int),
        InputParam("generator"),
    ]
    intermediate_outputs = [OutputParam("latents", torch.Tensor, "(B, 3, H, W) noise.")]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        height = block_state.height or components.default_size
        width = block_state.width or components.default_size
        block_state.latents = randn(
            (block_state.batch_size, 3, height, width), block_state.generator,
            torch.device("cpu"), torch.float32,
        )
        self.set_block_state(state, block_state)
        return components, state


class DemoImageLatentsStep(ModularPipelineBlocks):
    description = "Starts from the given image mixed with noise by `strength`."
    inputs = [
        InputParam("image", Image.Image, required=True, description="The image to edit."),
        InputParam("strength", float, default=0.5, description="0 keeps the image, 1 ignores it."),
        InputParam("batch_size", int, required=True),
        InputParam("generator"),
    ]
    intermediate_outputs = [OutputParam("latents", torch.Tensor)]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        image = to_pixels(block_state.image) * 2 - 1  # (1, 3, H, W) in [-1, 1]
        _, _, height, width = image.shape
        eps = randn((block_state.batch_size, 3, height, width), block_state.generator,
                    image.device, torch.float32)
        block_state.latents = (1 - block_state.strength) * image + block_state.strength * eps
        self.set_block_state(state, block_state)
        return components, state


class DemoDenoiserStep(StepForward):
    description = "Predicts the velocity for one step (one call for several requests' steps)."
    expected_components = [
        ComponentSpec("denoiser", DemoDenoiser, config={}, default_creation_method="from_config")
    ]
    inputs = [
        InputParam("latents", torch.Tensor, required=True),
        InputParam(None, kwargs_type="denoiser_input_fields"),
    ]
    intermediate_outputs = [OutputParam("noise_pred", torch.Tensor)]

    def forward_rows(self, components, block_state, i: int, t: torch.Tensor):
        latents = block_state.latents
        rows = latents.shape[0]
        sigma = components.scheduler.sigmas[i].reshape(1).expand(rows)  # this request's
        inputs = {"latents": latents, "sigma": sigma,
                  "target": block_state.prompt_embeds[:, :, None, None]}
        return [ForwardRows((type(self), id(components.denoiser), tuple(latents.shape[1:])),
                            inputs)]

    def forward(self, components, batch: ForwardBatch) -> torch.Tensor:
        inputs = batch.inputs
        return components.denoiser(inputs["latents"], inputs["sigma"], inputs["target"])

    def take_outputs(self, components, block_state, outputs, i: int, t: torch.Tensor) -> None:
        block_state.noise_pred = outputs[0]


class DemoSchedulerStep(ModularPipelineBlocks):
    description = "Advances the latents by one scheduler step."
    inputs = [InputParam("noise_pred", torch.Tensor, required=True)]
    intermediate_outputs = [OutputParam("latents", torch.Tensor)]

    def __call__(self, components, block_state, i: int, t: torch.Tensor):
        step = components.scheduler.step(block_state.noise_pred, t, block_state.latents)
        block_state.latents = step.prev_sample
        return components, block_state


class DemoDenoiseLoop(LoopSequentialPipelineBlocks):
    description = "The denoising loop."
    loop_inputs = [InputParam("timesteps", torch.Tensor, required=True)]
    loop_intermediate_outputs = [OutputParam("latents", torch.Tensor)]
    block_classes = [DemoDenoiserStep, DemoSchedulerStep]
    block_names = ["denoiser", "scheduler_step"]


class DemoText2ImageDenoise(SequentialPipelineBlocks):
    block_classes = [DemoSetTimestepsStep, DemoPrepareLatentsStep, DemoDenoiseLoop]
    block_names = ["set_timesteps", "prepare_latents", "loop"]


class DemoImage2ImageDenoise(SequentialPipelineBlocks):
    block_classes = [DemoSetTimestepsStep, DemoImageLatentsStep, DemoDenoiseLoop]
    block_names = ["set_timesteps", "image_latents", "loop"]


class DemoAutoDenoise(AutoPipelineBlocks):
    block_classes = [DemoImage2ImageDenoise, DemoText2ImageDenoise]
    block_names = ["image2image", "text2image"]
    block_trigger_inputs = ["image", None]


class DemoDecodeStep(ModularPipelineBlocks):
    description = "Turns latents into images."
    inputs = [
        InputParam("latents", torch.Tensor, required=True),
        InputParam("output_type", str, default="pil", description="'pil', 'np' or 'pt'."),
    ]
    intermediate_outputs = [OutputParam("images", list, "The generated images.")]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        check_output_type(block_state.output_type, self.path)
        # The latents already are pixels in [-1, 1] here: no VAE in the demo.
        block_state.images = postprocess(block_state.latents, block_state.output_type)
        self.set_block_state(state, block_state)
        return components, state


class DemoAutoBlocks(SequentialPipelineBlocks):
    """The demo pipeline: text to image, or image to image when `image` is given."""

    block_classes = [DemoTextEncoderStep, DemoAutoDenoise, DemoDecodeStep]
    block_names = ["text_encoder", "denoise", "decode"]
    _workflow_map = {
        "text2image": {"prompt": True},
        "image2image": {"prompt": True, "image": True},
    }

    @property
    def description(self) -> str:
        return "Demo pipeline of pure-tensor blocks: paints the colour the prompt names."
