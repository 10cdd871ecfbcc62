"""Which blocks class runs a checkpoint: a registry keyed by the index's class names.

A family registers the names its checkpoints carry (diffusers' `_class_name` such as
`StableDiffusionPipeline`, and its own blocks class name written by `save_pretrained`) with a
factory that reads the index (e.g. FLUX.2's `is_distilled`) and returns fresh blocks.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from blocks.block import ModularPipelineBlocks
from blocks.loading import CheckpointIndex

BlocksFactory = Callable[[CheckpointIndex], ModularPipelineBlocks]

_FACTORIES: dict[str, BlocksFactory] = {}
_BLOCK_CLASSES: dict[str, type[ModularPipelineBlocks]] = {}
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


def _load_builtin_families() -> None:
    for module in BUILTIN_FAMILY_MODULES:
        importlib.import_module(module)


def blocks_for_index(index: CheckpointIndex) -> ModularPipelineBlocks:
    """Fresh blocks for a checkpoint, or an error listing the known families."""
    _load_builtin_families()
    if index.blocks_class_name in _BLOCK_CLASSES:
        return _BLOCK_CLASSES[index.blocks_class_name]()
    for name in (index.blocks_class_name, index.class_name):
        if name in _FACTORIES:
            return _FACTORIES[name](index)
    known = sorted({*_FACTORIES, *_BLOCK_CLASSES})
    raise ValueError(
        f"{index.source}: no blocks family for index class "
        f"{index.blocks_class_name or index.class_name!r}; known: {', '.join(known) or '(none)'}"
    )
