"""Stable Diffusion XL as blocks: the `sdxl` family, declared at the bottom of this module for
checkpoints whose index names one of diffusers' SDXL pipelines (`StableDiffusionXLPipeline`,
`...Img2ImgPipeline`, `...InpaintPipeline`, `StableDiffusionXLControlNetPipeline`) or a
blockserve SDXL blocks class.

Its own stages are the two-encoder text encoder and the micro-conditioning; the rest is the UNet
latent-diffusion framework (`blocks.unet_*`). The tiny random-weight checkpoint factory lives
in `blocks.stable_diffusion_xl.tiny_model` and is not imported here.
"""

from blocks.families import DENOISER, TEXT_ENCODER, VAE, Family, register_family
from blocks.stable_diffusion_xl.before_denoise import (
    StableDiffusionXLImg2ImgSetTimestepsStep,
    StableDiffusionXLInpaintSetTimestepsStep,
    StableDiffusionXLPrepareAdditionalConditioningStep,
)
from blocks.stable_diffusion_xl.encoders import StableDiffusionXLTextEncoderStep
from blocks.stable_diffusion_xl.modular_blocks import (
    StableDiffusionXLAutoBlocks,
    StableDiffusionXLAutoDenoiseStep,
    StableDiffusionXLControlNetAutoBlocks,
    StableDiffusionXLControlNetAutoDenoiseStep,
    StableDiffusionXLControlNetDenoiseStep,
    StableDiffusionXLImg2ImgDenoiseStep,
    StableDiffusionXLInpaintDenoiseStep,
    StableDiffusionXLText2ImageDenoiseStep,
)
from blocks.stable_diffusion_xl.modular_pipeline import StableDiffusionXLModularPipeline

FAMILY = register_family(Family(
    name="sdxl",
    blocks=StableDiffusionXLAutoBlocks,
    checkpoint_classes={
        "StableDiffusionXLPipeline": StableDiffusionXLAutoBlocks,
        "StableDiffusionXLImg2ImgPipeline": StableDiffusionXLAutoBlocks,
        "StableDiffusionXLInpaintPipeline": StableDiffusionXLAutoBlocks,
        # A ControlNet checkpoint lists its `controlnet`: its blocks add the ControlNet branch.
        "StableDiffusionXLControlNetPipeline": StableDiffusionXLControlNetAutoBlocks,
    },
    heavy_blocks={"text_encoder": TEXT_ENCODER, "vae_encoder": VAE, "denoise": DENOISER,
                  "decode": VAE},
    size_multiple=8,  # SDXL's VAE scale factor (the tiny checkpoint's 4 divides it)
    schedulers={
        "euler": "EulerDiscreteScheduler",
        "euler_a": "EulerAncestralDiscreteScheduler",
        "ddim": "DDIMScheduler",
        "dpmpp_2m": "DPMSolverMultistepScheduler",
        "lcm": "LCMScheduler",
    },
    tiny_writer="blocks.stable_diffusion_xl.tiny_model:write_tiny_sdxl",
    tiny_options=("controlnet", "inpaint"),
    pipeline_classes=(StableDiffusionXLModularPipeline,),
))

__all__ = [
    "FAMILY",
    "StableDiffusionXLAutoBlocks",
    "StableDiffusionXLAutoDenoiseStep",
    "StableDiffusionXLControlNetAutoBlocks",
    "StableDiffusionXLControlNetAutoDenoiseStep",
    "StableDiffusionXLControlNetDenoiseStep",
    "StableDiffusionXLImg2ImgDenoiseStep",
    "StableDiffusionXLImg2ImgSetTimestepsStep",
    "StableDiffusionXLInpaintDenoiseStep",
    "StableDiffusionXLInpaintSetTimestepsStep",
    "StableDiffusionXLModularPipeline",
    "StableDiffusionXLPrepareAdditionalConditioningStep",
    "StableDiffusionXLText2ImageDenoiseStep",
    "StableDiffusionXLTextEncoderStep",
]
