"""The pipeline class Stable Diffusion checkpoints open as: `StableDiffusionModularPipeline`.

Its name goes into the `modular_model_index.json` that `save_pretrained` writes, so a folder
saved from workflow-pruned blocks (whose index names only `SequentialPipelineBlocks`) reopens
with the family's auto blocks, as diffusers reopens its own. diffusers 0.42.1 has no modular
Stable Diffusion 1.x/2.x pipeline, so it cannot open such a folder itself.

Not handled here: the blocks themselves (`blocks.stable_diffusion.modular_blocks`).
"""

from __future__ import annotations

from blocks.pipeline import ModularPipeline


class StableDiffusionModularPipeline(ModularPipeline):
    """Stable Diffusion 1.x/2.x: text-to-image, image-to-image, inpainting, ControlNet."""

    default_blocks_name = "StableDiffusionAutoBlocks"
