"""FLUX.2 [klein] as blocks: the `flux2-klein` family, declared at the bottom of this module
for checkpoints whose index names `Flux2KleinPipeline` (diffusers' classic pipeline), or the
modular names blockserve and diffusers both write: `Flux2KleinAutoBlocks` /
`Flux2KleinBaseAutoBlocks` and `Flux2KleinModularPipeline` / `Flux2KleinBaseModularPipeline`.

The tiny random-weight checkpoint factory lives in `blocks.flux2.tiny_model` and is not
imported here: it needs diffusers' pipeline classes, which product code never imports.
"""

from diffusers import Flux2Transformer2DModel

from blocks.families import DENOISER, TEXT_ENCODER, VAE, Family, register_family
from blocks.flux2.before_denoise import (
    Flux2KleinPrepareImageLatentsStep,
    Flux2KleinPrepareLatentsStep,
    Flux2KleinSetTimestepsStep,
    compute_empirical_mu,
)
from blocks.flux2.decoders import Flux2KleinDecodeStep
from blocks.flux2.denoise import (
    Flux2KleinDenoiseLoop,
    Flux2KleinLoopDenoiser,
    Flux2KleinSchedulerStep,
)
from blocks.flux2.encoders import (
    Flux2KleinImagePreprocessStep,
    Flux2KleinTextEncoderStep,
    Flux2KleinVaeEncodeStep,
)
from blocks.flux2.lora_names import bfl_module_names
from blocks.flux2.modular_blocks import (
    Flux2KleinAutoBlocks,
    Flux2KleinAutoDenoiseStep,
    Flux2KleinAutoVaeEncoderStep,
    Flux2KleinBaseAutoBlocks,
    Flux2KleinImageConditionedDenoiseStep,
    Flux2KleinText2ImageDenoiseStep,
    Flux2KleinVaeEncoderStep,
)
from blocks.flux2.modular_pipeline import (
    Flux2KleinBaseModularPipeline,
    Flux2KleinModularPipeline,
    klein_pipeline_class_name,
)
from blocks.flux2.step_cache import Flux2TransformerCacheHooks
from blocks.lora import register_module_names
from blocks.step_cache import register_cache_hooks

FAMILY = register_family(Family(
    name="flux2-klein",
    blocks=Flux2KleinAutoBlocks,
    checkpoint_classes={"Flux2KleinPipeline": Flux2KleinAutoBlocks},
    other_blocks=(Flux2KleinBaseAutoBlocks,),
    # diffusers' classic pipeline: distilled or base by the index's `is_distilled`, as diffusers
    # picks the modular class for it.
    choose_blocks=lambda index: Flux2KleinAutoBlocks if index.configs.get("is_distilled")
    else Flux2KleinBaseAutoBlocks,
    pipeline_classes=(Flux2KleinModularPipeline, Flux2KleinBaseModularPipeline),
    choose_pipeline_class=klein_pipeline_class_name,
    heavy_blocks={"text_encoder": TEXT_ENCODER, "vae_encoder": VAE, "denoise": DENOISER,
                  "decode": VAE},
    size_multiple=16,  # the VAE's 8 times the transformer's 2x2 patches
    schedulers={"flow_match_euler": "FlowMatchEulerDiscreteScheduler"},
    tiny_writer="blocks.flux2.tiny_model:write_tiny_flux2_klein",
    tiny_options=("base",),
))
register_cache_hooks(Flux2TransformerCacheHooks())
register_module_names(Flux2Transformer2DModel, bfl_module_names)  # kohya LoRA files

__all__ = [
    "FAMILY",
    "Flux2KleinAutoBlocks",
    "Flux2KleinAutoDenoiseStep",
    "Flux2KleinAutoVaeEncoderStep",
    "Flux2KleinBaseAutoBlocks",
    "Flux2KleinBaseModularPipeline",
    "Flux2KleinDecodeStep",
    "Flux2KleinDenoiseLoop",
    "Flux2KleinImageConditionedDenoiseStep",
    "Flux2KleinImagePreprocessStep",
    "Flux2KleinLoopDenoiser",
    "Flux2KleinModularPipeline",
    "Flux2KleinPrepareImageLatentsStep",
    "Flux2KleinPrepareLatentsStep",
    "Flux2KleinSchedulerStep",
    "Flux2KleinSetTimestepsStep",
    "Flux2KleinText2ImageDenoiseStep",
    "Flux2KleinTextEncoderStep",
    "Flux2KleinVaeEncodeStep",
    "Flux2KleinVaeEncoderStep",
    "compute_empirical_mu",
]
