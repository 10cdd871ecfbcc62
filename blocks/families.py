"""Which blocks and which pipeline class run a checkpoint: registries keyed by the class names
an index carries.

A family registers the names its checkpoints carry (diffusers' `_class_name` such as
`StableDiffusionPipeline`, and its blocks class name written by `save_pretrained`) with a
factory that reads the index (e.g. FLUX.2's `is_distilled`) and returns fresh blocks, and its
`ModularPipeline` subclasses (`Flux2KleinModularPipeline`), whose `default_blocks_name` is what
a checkpoint saved from pruned blocks (`_blocks_class_name: SequentialPipelineBlocks`) reopens
with, as in diffusers.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from blocks.block import ModularPipelineBlocks
from blocks.loading import CheckpointIndex

if TYPE_CHECKING:
    from blocks.pipeline import ModularPipeline

BlocksFactory = Callable[[CheckpointIndex], ModularPipelineBlocks]
# Picks a family's pipeline class from an index's configs (None: no index at hand).
PipelineChooser = Callable[[dict | None], str]

_FACTORIES: dict[str, BlocksFactory] = {}
_BLOCK_CLASSES: dict[str, type[ModularPipelineBlocks]] = {}
_PIPELINE_CLASSES: dict[str, type[ModularPipeline]] = {}
_PIPELINE_CHOOSERS: dict[str, PipelineChooser] = {}  # by blocks `model_name`
# Imported on first lookup, so `import blocks` stays light.
BUILTIN_FAMILY_MODULES: tuple[str, ...] = ("blocks.flux2", "blocks.stable_diffusion")


def register_family(class_names: tuple[str, ...], factory: BlocksFactory) -> None:
    """Make checkpoints whose index names one of `class_names` run with `factory`'s blocks."""
    for name in class_names:
        _FACTORIES[name] = factory


def register_blocks_class(cls: type[ModularPipelineBlocks]) -> type[ModularPipelineBlocks]:
    """Make a blocks class restorable by name from a `modular_model_index.json`."""
    _BLOCK_CLASSES[cls.__name__] = cls
    return cls


def register_pipeline_class(
    cls: type[ModularPipeline], model_name: str | None = None,
    choose: PipelineChooser | None = None,
) -> type[ModularPipeline]:
    """Make a pipeline class restorable by name, and (with `model_name`) the class that
    blocks of that family make: `choose(index configs)` names it when a family has several."""
    _PIPELINE_CLASSES[cls.__name__] = cls
    if model_name is not None:
        _PIPELINE_CHOOSERS[model_name] = choose or (lambda configs: cls.__name__)
    return cls


def _load_builtin_families() -> None:
    for module in BUILTIN_FAMILY_MODULES:
        importlib.import_module(module)


def blocks_class_named(name: str | None) -> type[ModularPipelineBlocks] | None:
    _load_builtin_families()
    return _BLOCK_CLASSES.get(name) if name else None


def pipeline_class_named(name: str | None) -> type[ModularPipeline] | None:
    _load_builtin_families()
    return _PIPELINE_CLASSES.get(name) if name else None


def pipeline_class_for_model(
    model_name: str | None, configs: dict | None = None
) -> type[ModularPipeline] | None:
    """The pipeline class a family's blocks make (given an index's configs, if any)."""
    _load_builtin_families()
    choose = _PIPELINE_CHOOSERS.get(model_name) if model_name else None
    return _PIPELINE_CLASSES[choose(configs)] if choose is not None else None


def blocks_for_index(index: CheckpointIndex) -> ModularPipelineBlocks:
    """Fresh blocks for a checkpoint, or an error listing the known families.

    The index's blocks class if it is one a family registered; else the default blocks of its
    pipeline class (a checkpoint saved from a workflow-pruned pipeline names only
    `SequentialPipelineBlocks`); else the family registered for its pipeline class name."""
    _load_builtin_families()
    if index.blocks_class_name in _BLOCK_CLASSES:
        return _BLOCK_CLASSES[index.blocks_class_name]()
    pipeline_class = _PIPELINE_CLASSES.get(index.class_name or "")
    default = getattr(pipeline_class, "default_blocks_name", None)
    if default in _BLOCK_CLASSES:
        return _BLOCK_CLASSES[default]()
    for name in (index.blocks_class_name, index.class_name):
        if name in _FACTORIES:
            return _FACTORIES[name](index)
    known = sorted({*_FACTORIES, *_BLOCK_CLASSES, *_PIPELINE_CLASSES})
    raise ValueError(
        f"{index.source}: no blocks family for index class "
        f"{index.blocks_class_name or index.class_name!r}; known: {', '.join(known) or '(none)'}"
    )
