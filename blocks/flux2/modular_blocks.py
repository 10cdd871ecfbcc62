"""FLUX.2 [klein] assembled: text encoder, optional reference-image encoder, denoise, decode.

The same blocks serve both variants: the step-distilled models (`is_distilled: true` in
the checkpoint's index; no guidance) and the undistilled base models (classifier-free
guidance with an empty negative prompt when `guidance_scale > 1`). `Flux2KleinBaseAutoBlocks`
is the base variant under diffusers' name: the same blocks with `is_distilled` false by default.

    pipe = ModularPipeline.from_pretrained("black-forest-labs/FLUX.2-klein-4B")
    pipe.load_components(dtype=torch.bfloat16)
    image = pipe(prompt="a red fox", num_inference_steps=4).images[0]
    edited = pipe(prompt="make it blue", image=image).images[0]
"""

from __future__ import annotations

from dataclasses import replace

from blocks.composites import AutoPipelineBlocks, SequentialPipelineBlocks
from blocks.flux2.before_denoise import (
    Flux2KleinPrepareImageLatentsStep,
    Flux2KleinPrepareLatentsStep,
    Flux2KleinSetTimestepsStep,
)
from blocks.flux2.decoders import Flux2KleinDecodeStep
from blocks.flux2.denoise import Flux2KleinDenoiseLoop
from blocks.flux2.encoders import (
    Flux2KleinImagePreprocessStep,
    Flux2KleinTextEncoderStep,
    Flux2KleinVaeEncodeStep,
)
from blocks.specs import ConfigSpec


class Flux2KleinVaeEncoderStep(SequentialPipelineBlocks):
    description = "Preprocesses the reference images and encodes them with the VAE."
    block_classes = [Flux2KleinImagePreprocessStep, Flux2KleinVaeEncodeStep]
    block_names = ["preprocess", "encode"]


class Flux2KleinAutoVaeEncoderStep(AutoPipelineBlocks):
    block_classes = [Flux2KleinVaeEncoderStep]
    block_names = ["image_conditioning"]
    block_trigger_inputs = ["image"]


class Flux2KleinText2ImageDenoiseStep(SequentialPipelineBlocks):
    description = "Denoises from noise, guided by the text only."
    block_classes = [
        Flux2KleinPrepareLatentsStep,
        Flux2KleinSetTimestepsStep,
        Flux2KleinDenoiseLoop,
    ]
    block_names = ["prepare_latents", "set_timesteps", "loop"]


class Flux2KleinImageConditionedDenoiseStep(SequentialPipelineBlocks):
    description = "Denoises from noise, attending to the reference image tokens too."
    block_classes = [
        Flux2KleinPrepareImageLatentsStep,
        Flux2KleinPrepareLatentsStep,
        Flux2KleinSetTimestepsStep,
        Flux2KleinDenoiseLoop,
    ]
    block_names = ["prepare_image_latents", "prepare_latents", "set_timesteps", "loop"]


class Flux2KleinAutoDenoiseStep(AutoPipelineBlocks):
    block_classes = [Flux2KleinImageConditionedDenoiseStep, Flux2KleinText2ImageDenoiseStep]
    block_names = ["image_conditioned", "text2image"]
    block_trigger_inputs = ["image_latents", None]


class Flux2KleinAutoBlocks(SequentialPipelineBlocks):
    """FLUX.2 [klein]: text to image, or image-conditioned generation when `image` is given."""

    block_classes = [
        Flux2KleinTextEncoderStep,
        Flux2KleinAutoVaeEncoderStep,
        Flux2KleinAutoDenoiseStep,
        Flux2KleinDecodeStep,
    ]
    block_names = ["text_encoder", "vae_encoder", "denoise", "decode"]
    _workflow_map = {
        "text2image": {"prompt": True},
        "image_conditioned": {"prompt": True, "image": True},
    }

    @property
    def description(self) -> str:
        return (
            "FLUX.2 [klein]: text-to-image, or generation conditioned on reference images "
            "when `image` is given; classifier-free guidance for the undistilled base model."
        )


class Flux2KleinBaseAutoBlocks(Flux2KleinAutoBlocks):
    """FLUX.2 [klein] base: text to image or image-conditioned, with classifier-free guidance."""

    @property
    def expected_configs(self) -> list[ConfigSpec]:
        return [
            replace(spec, default=False) if spec.name == "is_distilled" else spec
            for spec in super().expected_configs
        ]

    @property
    def description(self) -> str:
        return (
            "FLUX.2 [klein] base (undistilled): text-to-image, or generation conditioned on "
            "reference images when `image` is given, with classifier-free guidance."
        )
