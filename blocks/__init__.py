"""blockserve's block library: composable diffusion-pipeline blocks.

Build pipelines from small blocks that declare what they need and produce, run them with
`ModularPipeline`, and share weights between pipelines with `ComponentsManager`. This package
imports no serving stack (Ray, FastAPI, Prometheus); those live in `deployments` and `service`.
"""

from blocks.block import ModularPipelineBlocks
from blocks.components_manager import ComponentOutOfMemoryError, ComponentsManager
from blocks.composites import (
    AutoPipelineBlocks,
    ConditionalPipelineBlocks,
    LoopSequentialPipelineBlocks,
    SequentialPipelineBlocks,
)
from blocks.errors import GenerationCancelled, InvalidInput, Unavailable
from blocks.insertable_dict import InsertableDict
from blocks.loading import ComponentLoadError
from blocks.pipeline import ModularPipeline
from blocks.specs import ComponentSpec, ConfigSpec, InputParam, OutputParam, combine_inputs
from blocks.state import BlockState, PipelineState

__all__ = [
    "AutoPipelineBlocks",
    "BlockState",
    "ComponentLoadError",
    "ComponentOutOfMemoryError",
    "ComponentSpec",
    "ComponentsManager",
    "ConditionalPipelineBlocks",
    "ConfigSpec",
    "GenerationCancelled",
    "InputParam",
    "InsertableDict",
    "InvalidInput",
    "LoopSequentialPipelineBlocks",
    "ModularPipeline",
    "ModularPipelineBlocks",
    "OutputParam",
    "PipelineState",
    "SequentialPipelineBlocks",
    "Unavailable",
    "combine_inputs",
]
