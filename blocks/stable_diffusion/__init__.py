"""Stable Diffusion 1.x/2.x as blocks: the `sd` family, declared at the bottom of this module
for checkpoints whose index names one of diffusers' SD pipelines (`StableDiffusionPipeline`,
`...Img2ImgPipeline`, `...InpaintPipeline`, `StableDiffusionControlNetPipeline`) or a
blockserve SD blocks class.

Only the text encoder and the assembly are SD's own: the other stages come from the UNet
latent-diffusion framework modules (`blocks.unet_*`). The tiny random-weight checkpoint factory
lives in `blocks.stable_diffusion.tiny_model` and is not imported here.
"""

from blocks.families import DENOISER, TEXT_ENCODER, VAE, Family, register_family
from blocks.stable_diffusion.depth import DepthProcessorBlock
from blocks.stable_diffusion.encoders import StableDiffusionTextEncoderStep
from blocks.stable_diffusion.modular_blocks import (
    StableDiffusionAutoBlocks,
    StableDiffusionAutoDenoiseStep,
    StableDiffusionControlNetAutoBlocks,
    StableDiffusionControlNetAutoDenoiseStep,
    StableDiffusionControlNetDenoiseStep,
    StableDiffusionImg2ImgDenoiseStep,
    StableDiffusionInpaintDenoiseStep,
    StableDiffusionText2ImageDenoiseStep,
)
from blocks.stable_diffusion.modular_pipeline import StableDiffusionModularPipeline
from blocks.stable_diffusion.step_cache import UNetDeepCacheHooks
from blocks.step_cache import register_cache_hooks

FAMILY = register_family(Family(
    name="sd",
    blocks=StableDiffusionAutoBlocks,
    checkpoint_classes={
        "StableDiffusionPipeline": StableDiffusionAutoBlocks,
        "StableDiffusionImg2ImgPipeline": StableDiffusionAutoBlocks,
        "StableDiffusionInpaintPipeline": StableDiffusionAutoBlocks,
        # A ControlNet checkpoint lists its `controlnet`: its blocks add the ControlNet branch
        # (and, being a subclass, are StableDiffusionAutoBlocks otherwise).
        "StableDiffusionControlNetPipeline": StableDiffusionControlNetAutoBlocks,
    },
    heavy_blocks={"text_encoder": TEXT_ENCODER, "vae_encoder": VAE, "denoise": DENOISER,
                  "decode": VAE},
    size_multiple=8,  # the VAE's scale factor
    schedulers={
        "euler": "EulerDiscreteScheduler",
        "euler_a": "EulerAncestralDiscreteScheduler",
        "ddim": "DDIMScheduler",
        "dpmpp_2m": "DPMSolverMultistepScheduler",
        "lcm": "LCMScheduler",
    },
    tiny_writer="blocks.stable_diffusion.tiny_model:write_tiny_sd",
    tiny_options=("controlnet", "depth", "inpaint"),
    pipeline_classes=(StableDiffusionModularPipeline,),
))
register_cache_hooks(UNetDeepCacheHooks())

__all__ = [
    "FAMILY",
    "DepthProcessorBlock",
    "StableDiffusionAutoBlocks",
    "StableDiffusionAutoDenoiseStep",
    "StableDiffusionControlNetAutoBlocks",
    "StableDiffusionControlNetAutoDenoiseStep",
    "StableDiffusionControlNetDenoiseStep",
    "StableDiffusionImg2ImgDenoiseStep",
    "StableDiffusionInpaintDenoiseStep",
    "StableDiffusionModularPipeline",
    "StableDiffusionText2ImageDenoiseStep",
    "StableDiffusionTextEncoderStep",
]
