"""Stable Diffusion (1.x, 2.x and turbo-style checkpoints) assembled from its stages.

    pipe = ModularPipeline.from_pretrained("path/or/repo")
    pipe.load_components(dtype=torch.float16)
    image = pipe(prompt="a red fox", num_inference_steps=30).images[0]
    edited = pipe(prompt="a blue fox", image=image, strength=0.6).images[0]
    filled = pipe(prompt="a cat", image=image, mask_image=mask).images[0]

`StableDiffusionAutoBlocks` picks the workflow from the inputs: `mask_image` (with `image`)
inpaints, `image` alone edits, otherwise text to image. `StableDiffusionControlNetAutoBlocks`
adds a ControlNet text-to-image branch, chosen when `control_image` is given. The scheduler is
whatever `pipe.update_components(scheduler=...)` sets; the blocks only use diffusers'
generic scheduler interface.

Only the text encoder is SD's own; every other stage is the UNet latent-diffusion framework's
(`blocks.unet_vae`, `blocks.unet_latents`, `blocks.unet_denoise`, `blocks.unet_controlnet`),
which SDXL shares. Not handled here: the stages themselves.
"""

from __future__ import annotations

from blocks.composites import AutoPipelineBlocks, SequentialPipelineBlocks
from blocks.stable_diffusion.encoders import StableDiffusionTextEncoderStep
from blocks.unet_controlnet import UNetControlNetDenoiseLoop, UNetControlNetInputStep
from blocks.unet_denoise import UNetDenoiseLoop, UNetInpaintDenoiseLoop
from blocks.unet_latents import (
    UNetGuidanceEmbeddingStep,
    UNetImg2ImgPrepareLatentsStep,
    UNetImg2ImgSetTimestepsStep,
    UNetInpaintPrepareLatentsStep,
    UNetInpaintPrepareMaskLatentsStep,
    UNetInpaintSetTimestepsStep,
    UNetPrepareLatentsStep,
    UNetSetTimestepsStep,
)
from blocks.unet_vae import UNetAutoVaeEncoderStep, UNetDecodeStep

# -- denoise -----------------------------------------------------------------------------------


class StableDiffusionText2ImageDenoiseStep(SequentialPipelineBlocks):
    description = "Denoises from pure noise, guided by the text."
    block_classes = [
        UNetSetTimestepsStep,
        UNetPrepareLatentsStep,
        UNetGuidanceEmbeddingStep,
        UNetDenoiseLoop,
    ]
    block_names = ["set_timesteps", "prepare_latents", "guidance_embedding", "loop"]


class StableDiffusionImg2ImgDenoiseStep(SequentialPipelineBlocks):
    description = "Denoises from the image's latents noised according to `strength`."
    block_classes = [
        UNetImg2ImgSetTimestepsStep,
        UNetImg2ImgPrepareLatentsStep,
        UNetGuidanceEmbeddingStep,
        UNetDenoiseLoop,
    ]
    block_names = ["set_timesteps", "prepare_latents", "guidance_embedding", "loop"]


class StableDiffusionInpaintDenoiseStep(SequentialPipelineBlocks):
    description = "Denoises the masked region, keeping the rest of the image."
    block_classes = [
        UNetInpaintSetTimestepsStep,
        UNetInpaintPrepareLatentsStep,
        UNetInpaintPrepareMaskLatentsStep,
        UNetGuidanceEmbeddingStep,
        UNetInpaintDenoiseLoop,
    ]
    block_names = [
        "set_timesteps", "prepare_latents", "prepare_mask_latents", "guidance_embedding", "loop"
    ]


class StableDiffusionControlNetDenoiseStep(SequentialPipelineBlocks):
    description = "Denoises from pure noise, guided by the text and a ControlNet."
    block_classes = [
        UNetSetTimestepsStep,
        UNetControlNetInputStep,
        UNetPrepareLatentsStep,
        UNetGuidanceEmbeddingStep,
        UNetControlNetDenoiseLoop,
    ]
    block_names = [
        "set_timesteps", "controlnet_input", "prepare_latents", "guidance_embedding", "loop"
    ]


class StableDiffusionAutoDenoiseStep(AutoPipelineBlocks):
    block_classes = [
        StableDiffusionInpaintDenoiseStep,
        StableDiffusionImg2ImgDenoiseStep,
        StableDiffusionText2ImageDenoiseStep,
    ]
    block_names = ["inpaint", "image2image", "text2image"]
    block_trigger_inputs = ["mask", "image_posterior", None]


class StableDiffusionControlNetAutoDenoiseStep(AutoPipelineBlocks):
    block_classes = [
        StableDiffusionControlNetDenoiseStep,
        StableDiffusionInpaintDenoiseStep,
        StableDiffusionImg2ImgDenoiseStep,
        StableDiffusionText2ImageDenoiseStep,
    ]
    block_names = ["controlnet", "inpaint", "image2image", "text2image"]
    block_trigger_inputs = ["control_image", "mask", "image_posterior", None]


# -- whole pipelines ---------------------------------------------------------------------------


class StableDiffusionAutoBlocks(SequentialPipelineBlocks):
    """Stable Diffusion: text to image, image to image (`image`), inpainting (`image` and
    `mask_image`)."""

    block_classes = [
        StableDiffusionTextEncoderStep,
        UNetAutoVaeEncoderStep,
        StableDiffusionAutoDenoiseStep,
        UNetDecodeStep,
    ]
    block_names = ["text_encoder", "vae_encoder", "denoise", "decode"]
    _workflow_map = {
        "text2image": {"prompt": True},
        "image2image": {"prompt": True, "image": True},
        "inpaint": {"prompt": True, "image": True, "mask_image": True},
    }

    @property
    def description(self) -> str:
        return (
            "Stable Diffusion 1.x/2.x: text-to-image, image-to-image when `image` is given, "
            "inpainting when `mask_image` is given too; classifier-free guidance when "
            "guidance_scale > 1."
        )


class StableDiffusionControlNetAutoBlocks(StableDiffusionAutoBlocks):
    """Stable Diffusion with a ControlNet: as `StableDiffusionAutoBlocks`, plus ControlNet
    text-to-image when `control_image` is given."""

    block_classes = [
        StableDiffusionTextEncoderStep,
        UNetAutoVaeEncoderStep,
        StableDiffusionControlNetAutoDenoiseStep,
        UNetDecodeStep,
    ]
    _workflow_map = {
        **StableDiffusionAutoBlocks._workflow_map,
        "controlnet": {"prompt": True, "control_image": True},
    }

    @property
    def description(self) -> str:
        return (
            f"{super().description} With `control_image`, a ControlNet steers text-to-image."
        )
