"""Stable Diffusion XL assembled from its stages.

    pipe = ModularPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0")
    pipe.load_components(dtype={"default": torch.float16, "vae": torch.float32})
    image = pipe(prompt="a red fox", num_inference_steps=30).images[0]
    edited = pipe(prompt="a blue fox", image=image, strength=0.5).images[0]
    filled = pipe(prompt="a cat", image=image, mask_image=mask).images[0]

`StableDiffusionXLAutoBlocks` picks the workflow from the inputs: `mask_image` (with `image`)
inpaints, `image` alone edits, otherwise text to image. `StableDiffusionXLControlNetAutoBlocks`
adds a ControlNet text-to-image branch, chosen when `control_image` is given. The scheduler is
whatever `pipe.update_components(scheduler=...)` sets.

What is SDXL's own: the two-encoder text stage (`encoders`), the micro-conditioning and the
strength defaults (`before_denoise`). Every other stage is the UNet latent-diffusion
framework's (`blocks.unet_vae`, `blocks.unet_latents`, `blocks.unet_denoise`,
`blocks.unet_controlnet`), shared with Stable Diffusion 1.x/2.x; its denoiser passes the pooled
embeddings and time ids to the UNet's added conditioning.

Not handled here: the refiner, IP-Adapter, `denoising_start` / `denoising_end` (base + refiner
ensembles), `padding_mask_crop`.
"""

from __future__ import annotations

from blocks.composites import AutoPipelineBlocks, SequentialPipelineBlocks
from blocks.stable_diffusion_xl.before_denoise import (
    StableDiffusionXLImg2ImgSetTimestepsStep,
    StableDiffusionXLInpaintSetTimestepsStep,
    StableDiffusionXLPrepareAdditionalConditioningStep,
)
from blocks.stable_diffusion_xl.encoders import StableDiffusionXLTextEncoderStep
from blocks.unet_controlnet import UNetControlNetDenoiseLoop, UNetControlNetInputStep
from blocks.unet_denoise import UNetDenoiseLoop, UNetInpaintDenoiseLoop
from blocks.unet_latents import (
    UNetGuidanceEmbeddingStep,
    UNetImg2ImgPrepareLatentsStep,
    UNetInpaintPrepareLatentsStep,
    UNetInpaintPrepareMaskLatentsStep,
    UNetPrepareLatentsStep,
    UNetSetTimestepsStep,
)
from blocks.unet_vae import UNetAutoVaeEncoderStep, UNetDecodeStep

# -- denoise -----------------------------------------------------------------------------------


class StableDiffusionXLText2ImageDenoiseStep(SequentialPipelineBlocks):
    description = "Denoises from pure noise, guided by the text and the micro-conditioning."
    block_classes = [
        UNetSetTimestepsStep,
        UNetPrepareLatentsStep,
        StableDiffusionXLPrepareAdditionalConditioningStep,
        UNetGuidanceEmbeddingStep,
        UNetDenoiseLoop,
    ]
    block_names = [
        "set_timesteps", "prepare_latents", "prepare_add_cond", "guidance_embedding", "loop"
    ]


class StableDiffusionXLImg2ImgDenoiseStep(SequentialPipelineBlocks):
    description = "Denoises from the image's latents noised according to `strength`."
    block_classes = [
        StableDiffusionXLImg2ImgSetTimestepsStep,
        UNetImg2ImgPrepareLatentsStep,
        StableDiffusionXLPrepareAdditionalConditioningStep,
        UNetGuidanceEmbeddingStep,
        UNetDenoiseLoop,
    ]
    block_names = [
        "set_timesteps", "prepare_latents", "prepare_add_cond", "guidance_embedding", "loop"
    ]


class StableDiffusionXLInpaintDenoiseStep(SequentialPipelineBlocks):
    description = "Denoises the masked region, keeping the rest of the image."
    block_classes = [
        StableDiffusionXLInpaintSetTimestepsStep,
        UNetInpaintPrepareLatentsStep,
        UNetInpaintPrepareMaskLatentsStep,
        StableDiffusionXLPrepareAdditionalConditioningStep,
        UNetGuidanceEmbeddingStep,
        UNetInpaintDenoiseLoop,
    ]
    block_names = [
        "set_timesteps", "prepare_latents", "prepare_mask_latents", "prepare_add_cond",
        "guidance_embedding", "loop",
    ]


class StableDiffusionXLControlNetDenoiseStep(SequentialPipelineBlocks):
    description = "Denoises from pure noise, guided by the text and a ControlNet."
    block_classes = [
        UNetSetTimestepsStep,
        UNetControlNetInputStep,
        UNetPrepareLatentsStep,
        StableDiffusionXLPrepareAdditionalConditioningStep,
        UNetGuidanceEmbeddingStep,
        UNetControlNetDenoiseLoop,
    ]
    block_names = [
        "set_timesteps", "controlnet_input", "prepare_latents", "prepare_add_cond",
        "guidance_embedding", "loop",
    ]


class StableDiffusionXLAutoDenoiseStep(AutoPipelineBlocks):
    block_classes = [
        StableDiffusionXLInpaintDenoiseStep,
        StableDiffusionXLImg2ImgDenoiseStep,
        StableDiffusionXLText2ImageDenoiseStep,
    ]
    block_names = ["inpaint", "image2image", "text2image"]
    block_trigger_inputs = ["mask", "image_posterior", None]


class StableDiffusionXLControlNetAutoDenoiseStep(AutoPipelineBlocks):
    block_classes = [
        StableDiffusionXLControlNetDenoiseStep,
        StableDiffusionXLInpaintDenoiseStep,
        StableDiffusionXLImg2ImgDenoiseStep,
        StableDiffusionXLText2ImageDenoiseStep,
    ]
    block_names = ["controlnet", "inpaint", "image2image", "text2image"]
    block_trigger_inputs = ["control_image", "mask", "image_posterior", None]


# -- whole pipelines ---------------------------------------------------------------------------


class StableDiffusionXLAutoBlocks(SequentialPipelineBlocks):
    """Stable Diffusion XL: text to image, image to image (`image`), inpainting (`image` and
    `mask_image`)."""

    block_classes = [
        StableDiffusionXLTextEncoderStep,
        UNetAutoVaeEncoderStep,
        StableDiffusionXLAutoDenoiseStep,
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
            "Stable Diffusion XL: text-to-image, image-to-image when `image` is given, "
            "inpainting when `mask_image` is given too; two text encoders, micro-conditioning, "
            "classifier-free guidance when guidance_scale > 1."
        )


class StableDiffusionXLControlNetAutoBlocks(StableDiffusionXLAutoBlocks):
    """Stable Diffusion XL with a ControlNet: as `StableDiffusionXLAutoBlocks`, plus ControlNet
    text-to-image when `control_image` is given."""

    block_classes = [
        StableDiffusionXLTextEncoderStep,
        UNetAutoVaeEncoderStep,
        StableDiffusionXLControlNetAutoDenoiseStep,
        UNetDecodeStep,
    ]
    _workflow_map = {
        **StableDiffusionXLAutoBlocks._workflow_map,
        "controlnet": {"prompt": True, "control_image": True},
    }

    @property
    def description(self) -> str:
        return (
            f"{super().description} With `control_image`, a ControlNet steers text-to-image."
        )
