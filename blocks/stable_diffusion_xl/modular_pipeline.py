"""The pipeline class Stable Diffusion XL checkpoints open as: `StableDiffusionXLModularPipeline`
(diffusers' name for its modular SDXL pipeline).

Its name goes into the `modular_model_index.json` that `save_pretrained` writes, so a folder
saved from workflow-pruned blocks (whose index names only `SequentialPipelineBlocks`) reopens
with the family's auto blocks.

Not handled here: the blocks themselves (`blocks.stable_diffusion_xl.modular_blocks`).
"""

from __future__ import annotations

from blocks.pipeline import ModularPipeline


class StableDiffusionXLModularPipeline(ModularPipeline):
    """Stable Diffusion XL: text-to-image, image-to-image, inpainting, ControlNet."""

    default_blocks_name = "StableDiffusionXLAutoBlocks"
