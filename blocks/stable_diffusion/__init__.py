"""Stable Diffusion 1.x/2.x as blocks, registered for checkpoints whose index names one of
diffusers' SD pipelines (`StableDiffusionPipeline`, `...Img2ImgPipeline`, `...InpaintPipeline`,
`StableDiffusionControlNetPipeline`) or a blockserve SD blocks class.

The tiny random-weight checkpoint factory lives in `blocks.stable_diffusion.tiny_model` and is
not imported here.
"""

from blocks.families import register_blocks_class, register_family, register_pipeline_class
from blocks.stable_diffusion.before_denoise import (
    StableDiffusionGuidanceEmbeddingStep,
    StableDiffusionImg2ImgPrepareLatentsStep,
    StableDiffusionImg2ImgSetTimestepsStep,
    StableDiffusionInpaintPrepareLatentsStep,
    StableDiffusionInpaintPrepareMaskLatentsStep,
    StableDiffusionInpaintSetTimestepsStep,
    StableDiffusionPrepareLatentsStep,
    StableDiffusionSetTimestepsStep,
)
from blocks.stable_diffusion.controlnet import (
    StableDiffusionControlNetDenoiseLoop,
    StableDiffusionControlNetInputStep,
    StableDiffusionControlNetLoopDenoiser,
)
from blocks.stable_diffusion.decoders import StableDiffusionDecodeStep
from blocks.stable_diffusion.denoise import (
    StableDiffusionDenoiseLoop,
    StableDiffusionInpaintDenoiseLoop,
    StableDiffusionInpaintLoopAfterDenoiser,
    StableDiffusionInpaintLoopBeforeDenoiser,
    StableDiffusionLoopAfterDenoiser,
    StableDiffusionLoopBeforeDenoiser,
    StableDiffusionLoopDenoiser,
)
from blocks.stable_diffusion.depth import DepthProcessorBlock
from blocks.stable_diffusion.encoders import (
    StableDiffusionImagePreprocessStep,
    StableDiffusionInpaintPreprocessStep,
    StableDiffusionInpaintVaeEncodeStep,
    StableDiffusionTextEncoderStep,
    StableDiffusionVaeEncodeStep,
)
from blocks.stable_diffusion.modular_blocks import (
    StableDiffusionAutoBlocks,
    StableDiffusionAutoDenoiseStep,
    StableDiffusionAutoVaeEncoderStep,
    StableDiffusionControlNetAutoBlocks,
    StableDiffusionControlNetAutoDenoiseStep,
    StableDiffusionControlNetDenoiseStep,
    StableDiffusionImg2ImgDenoiseStep,
    StableDiffusionImg2ImgVaeEncoderStep,
    StableDiffusionInpaintDenoiseStep,
    StableDiffusionInpaintVaeEncoderStep,
    StableDiffusionText2ImageDenoiseStep,
)
from blocks.stable_diffusion.modular_pipeline import StableDiffusionModularPipeline
from blocks.stable_diffusion.step_cache import UNetDeepCacheHooks
from blocks.step_cache import register_cache_hooks

register_cache_hooks(UNetDeepCacheHooks())
register_pipeline_class(StableDiffusionModularPipeline, "stable-diffusion")
register_blocks_class(StableDiffusionAutoBlocks)
register_blocks_class(StableDiffusionControlNetAutoBlocks)
register_family(
    ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"),
    lambda index: StableDiffusionAutoBlocks(),
)
# A ControlNet checkpoint lists its `controlnet`: its blocks add the ControlNet branch (and,
# being a subclass, are StableDiffusionAutoBlocks otherwise).
register_family(
    ("StableDiffusionControlNetPipeline",), lambda index: StableDiffusionControlNetAutoBlocks()
)

__all__ = [
    "DepthProcessorBlock",
    "StableDiffusionAutoBlocks",
    "StableDiffusionAutoDenoiseStep",
    "StableDiffusionAutoVaeEncoderStep",
    "StableDiffusionControlNetAutoBlocks",
    "StableDiffusionControlNetAutoDenoiseStep",
    "StableDiffusionControlNetDenoiseLoop",
    "StableDiffusionControlNetDenoiseStep",
    "StableDiffusionControlNetInputStep",
    "StableDiffusionControlNetLoopDenoiser",
    "StableDiffusionDecodeStep",
    "StableDiffusionDenoiseLoop",
    "StableDiffusionGuidanceEmbeddingStep",
    "StableDiffusionImagePreprocessStep",
    "StableDiffusionImg2ImgDenoiseStep",
    "StableDiffusionImg2ImgPrepareLatentsStep",
    "StableDiffusionImg2ImgSetTimestepsStep",
    "StableDiffusionImg2ImgVaeEncoderStep",
    "StableDiffusionInpaintDenoiseLoop",
    "StableDiffusionInpaintDenoiseStep",
    "StableDiffusionInpaintLoopAfterDenoiser",
    "StableDiffusionInpaintLoopBeforeDenoiser",
    "StableDiffusionInpaintPrepareLatentsStep",
    "StableDiffusionInpaintPrepareMaskLatentsStep",
    "StableDiffusionInpaintPreprocessStep",
    "StableDiffusionInpaintSetTimestepsStep",
    "StableDiffusionInpaintVaeEncodeStep",
    "StableDiffusionInpaintVaeEncoderStep",
    "StableDiffusionLoopAfterDenoiser",
    "StableDiffusionLoopBeforeDenoiser",
    "StableDiffusionLoopDenoiser",
    "StableDiffusionModularPipeline",
    "StableDiffusionPrepareLatentsStep",
    "StableDiffusionSetTimestepsStep",
    "StableDiffusionText2ImageDenoiseStep",
    "StableDiffusionTextEncoderStep",
    "StableDiffusionVaeEncodeStep",
]
