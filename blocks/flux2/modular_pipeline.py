"""The pipeline classes FLUX.2 [klein] checkpoints open as, under diffusers' names.

`Flux2KleinModularPipeline` runs the step-distilled checkpoints (`is_distilled: true`),
`Flux2KleinBaseModularPipeline` the undistilled base ones; `ModularPipeline.from_pretrained`
picks between them from the index as diffusers does, and writes the name into the
`modular_model_index.json` it saves, which is how diffusers knows which class to open it with.
Both run the blocks they are given; alone, they run the family's auto blocks.

Not handled here: the blocks themselves (`blocks.flux2.modular_blocks`).
"""

from __future__ import annotations

from blocks.pipeline import ModularPipeline


class Flux2KleinModularPipeline(ModularPipeline):
    """FLUX.2 [klein], step-distilled: no classifier-free guidance."""

    default_blocks_name = "Flux2KleinAutoBlocks"


class Flux2KleinBaseModularPipeline(ModularPipeline):
    """FLUX.2 [klein] base (undistilled): classifier-free guidance when `guidance_scale > 1`."""

    default_blocks_name = "Flux2KleinBaseAutoBlocks"


def klein_pipeline_class_name(configs: dict | None) -> str:
    """Which class a checkpoint with these index configs opens as (distilled without any)."""
    if configs is None or configs.get("is_distilled"):
        return Flux2KleinModularPipeline.__name__
    return Flux2KleinBaseModularPipeline.__name__
