"""Model families: everything blockserve knows about a family, declared in the family's folder.

A family is one subpackage of `blocks` (`blocks/stable_diffusion/`, `blocks/flux2/`,
`blocks/demo/`). Its `__init__.py` declares the whole family once, where it exports its
blocks:

    register_family(Family(
        name="sd",                                  # the models file's `family:`
        blocks=StableDiffusionAutoBlocks,           # its blocks (and so its workflows)
        checkpoint_classes={                        # index `_class_name` -> blocks it runs
            "StableDiffusionPipeline": StableDiffusionAutoBlocks,
            "StableDiffusionControlNetPipeline": StableDiffusionControlNetAutoBlocks,
        },
        heavy_blocks={"text_encoder": TEXT_ENCODER, "vae_encoder": VAE,   # top-level block
                      "denoise": DENOISER, "decode": VAE},                # -> its role
        size_multiple=8,                            # width and height must be multiples
        schedulers={"euler": "EulerDiscreteScheduler", "ddim": "DDIMScheduler"},
        tiny_writer="blocks.stable_diffusion.tiny_model:write_tiny_sd",
        tiny_options=("controlnet", "depth", "inpaint"),
        pipeline_classes=(StableDiffusionModularPipeline,),  # what its blocks' pipeline is
    ))

Nothing outside the folder names the family. `ModularPipeline.from_pretrained` finds the
blocks for a checkpoint by its index's class name (diffusers' `_class_name` such as
`StableDiffusionPipeline`, a blocks class name written by `save_pretrained`, or a family's
`ModularPipeline` subclass, whose `default_blocks_name` is what a checkpoint saved from pruned
blocks reopens with, as in diffusers), and the pipeline class by the blocks' `model_name`
(`choose_pipeline_class` when a family has several, e.g. FLUX.2 [klein] base or distilled by
the index's `is_distilled`); the service validates the models file's
`family` against `family_names()` and reads a family's serving facts from `get_family(name)`;
Ray mode runs each `heavy_blocks` entry on the deployment of its role (blocks absent from it
run in the router: a weight-free family has nothing remote). Built-in families are found by
importing every subpackage of `blocks` on the first lookup (so `import blocks` stays light
and adding a family is adding a folder); a family defined elsewhere calls `register_family`
when it is imported.

Not handled here: loading a checkpoint (`blocks.loading`), serving (`service`), and placing
roles on deployments (`deployments`).
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from blocks.block import ModularPipelineBlocks
from blocks.loading import CheckpointIndex

if TYPE_CHECKING:
    from blocks.pipeline import ModularPipeline

HeavyRole = Literal["text_encoder", "denoiser", "vae"]
TEXT_ENCODER: HeavyRole = "text_encoder"
DENOISER: HeavyRole = "denoiser"
VAE: HeavyRole = "vae"
HEAVY_ROLES: tuple[HeavyRole, ...] = (TEXT_ENCODER, DENOISER, VAE)

FAMILY_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Family:
    """What blockserve knows about one model family (see the module docstring)."""

    name: str
    blocks: type[ModularPipelineBlocks]
    checkpoint_classes: Mapping[str, type[ModularPipelineBlocks]] = field(default_factory=dict)
    # Top-level block name -> the role of the weights it runs; other blocks are light.
    heavy_blocks: Mapping[str, HeavyRole] = field(default_factory=dict)
    size_multiple: int = 8  # the VAE's scale factor (times a transformer's patch size)
    # Request name -> diffusers scheduler class name; a checkpoint's own is the default.
    schedulers: Mapping[str, str] = field(default_factory=dict)
    # "module:function(out_dir, *, seed, size, device, **options)" writing a random-weight
    # checkpoint (size "tiny", or "real": the published architecture);
    # `tiny_options` are the boolean keyword options it takes (variants of the checkpoint).
    tiny_writer: str | None = None
    tiny_options: tuple[str, ...] = ()
    needs_checkpoint: bool = True  # False: the blocks run without weights (the demo)
    # Other blocks classes of the family a checkpoint may name (restorable by name).
    other_blocks: tuple[type[ModularPipelineBlocks], ...] = ()
    # The blocks class for a checkpoint named in `checkpoint_classes` when its index decides
    # (FLUX.2 [klein]: base or distilled by `is_distilled`); None: the mapping's class.
    choose_blocks: Callable[[CheckpointIndex], type[ModularPipelineBlocks]] | None = None
    # The `ModularPipeline` subclasses the family's blocks make (the first unless
    # `choose_pipeline_class(index configs or None)` names another).
    pipeline_classes: tuple[type[ModularPipeline], ...] = ()
    choose_pipeline_class: Callable[[dict | None], str] | None = None

    @property
    def workflows(self) -> tuple[str, ...]:
        return tuple(getattr(self.blocks(), "available_workflows", ()))

    def heavy_block_names(self, role: HeavyRole) -> tuple[str, ...]:
        """The top-level blocks whose weights have `role`."""
        return tuple(name for name, each in self.heavy_blocks.items() if each == role)

    def scheduler_class(self, name: str) -> type:
        """The diffusers scheduler class a request's scheduler `name` stands for."""
        import diffusers

        if name not in self.schedulers:
            raise ValueError(f"scheduler {name!r} is not one of "
                             f"{', '.join(self.schedulers) or '(none)'} for family {self.name!r}")
        return getattr(diffusers, self.schedulers[name])

    def scheduler_name_of(self, scheduler: Any) -> str | None:
        """The request name of a scheduler object's class, if this family lists it."""
        class_name = type(scheduler).__name__
        for name, listed in self.schedulers.items():
            if listed == class_name:
                return name
        return None

    def write_tiny(self, out_dir: str | Path, seed: int = 0, size: str = "tiny",
                   device: Any = "cpu", **options: bool) -> Path:
        """Write this family's random-weight checkpoint to `out_dir`: its tiny architecture, or
        with `size="real"` its published one (a writer raises ValueError for a size or option
        combination it does not offer); `device` is where the models are built."""
        if self.tiny_writer is None:
            raise ValueError(f"family {self.name!r} has no tiny-checkpoint writer")
        unknown = sorted(set(options) - set(self.tiny_options))
        if unknown:
            raise ValueError(f"family {self.name!r}: unknown tiny-checkpoint option(s) "
                             f"{', '.join(unknown)}; available: "
                             f"{', '.join(self.tiny_options) or '(none)'}")
        module_name, function_name = self.tiny_writer.split(":")
        writer = getattr(importlib.import_module(module_name), function_name)
        return Path(writer(out_dir, seed=seed, size=size, device=device, **options))


_lock = threading.RLock()
_FAMILIES: dict[str, Family] = {}
_BY_CHECKPOINT_CLASS: dict[str, Family] = {}
_BLOCK_CLASSES: dict[str, type[ModularPipelineBlocks]] = {}
_PIPELINE_CLASSES: dict[str, type[ModularPipeline]] = {}
_PIPELINE_CHOOSERS: dict[str, Callable[[dict | None], str]] = {}  # by blocks `model_name`
_builtins_loaded = False


def register_family(family: Family) -> Family:
    """Declare `family`: its name, the checkpoints it opens and its facts (module docstring).

    Raises ValueError for a name or checkpoint class another family has, and for heavy blocks
    that are not top-level blocks of `family.blocks` with a known role."""
    problems = _declaration_problems(family)
    if problems:
        raise ValueError(f"family {family.name!r}: " + "; ".join(problems))
    with _lock:
        existing = _FAMILIES.get(family.name)
        if existing is not None and existing != family:
            raise ValueError(f"family {family.name!r} is already registered")
        for class_name in family.checkpoint_classes:
            owner = next((f.name for f in _FAMILIES.values() if f.name != family.name
                          and class_name in f.checkpoint_classes), None)
            if owner is not None:
                raise ValueError(f"family {family.name!r}: checkpoint class {class_name!r} "
                                 f"already belongs to family {owner!r}")
        _FAMILIES[family.name] = family
        _BY_CHECKPOINT_CLASS.update(dict.fromkeys(family.checkpoint_classes, family))
        blocks_classes = (family.blocks, *family.checkpoint_classes.values(),
                          *family.other_blocks)
        for cls in blocks_classes:
            _BLOCK_CLASSES[cls.__name__] = cls
        for cls in family.pipeline_classes:
            _PIPELINE_CLASSES[cls.__name__] = cls
        if family.pipeline_classes:
            default = family.pipeline_classes[0].__name__
            choose = family.choose_pipeline_class or (lambda configs: default)
            for cls in blocks_classes:
                model_name = getattr(cls(), "model_name", None)
                if model_name:
                    _PIPELINE_CHOOSERS[model_name] = choose
    return family


def _declaration_problems(family: Family) -> list[str]:
    problems = []
    if not FAMILY_NAME_PATTERN.match(family.name):
        problems.append(f"the name must match {FAMILY_NAME_PATTERN.pattern}")
    if family.size_multiple < 1:
        problems.append(f"size_multiple must be >= 1, got {family.size_multiple}")
    if family.tiny_writer is not None and family.tiny_writer.count(":") != 1:
        problems.append(f"tiny_writer must be 'module:function', got {family.tiny_writer!r}")
    top_level = set(getattr(family.blocks(), "sub_blocks", {}))
    for name, role in family.heavy_blocks.items():
        if role not in HEAVY_ROLES:
            problems.append(f"heavy block {name!r} has role {role!r}; roles: "
                            f"{', '.join(HEAVY_ROLES)}")
        if name not in top_level:
            problems.append(f"heavy block {name!r} is not a top-level block of "
                            f"{family.blocks.__name__} ({', '.join(top_level) or 'none'})")
    return problems


def register_blocks_class(cls: type[ModularPipelineBlocks]) -> type[ModularPipelineBlocks]:
    """Make a blocks class restorable by name from a `modular_model_index.json` (families'
    classes are registered by `register_family`; this is for blocks outside a family)."""
    with _lock:
        _BLOCK_CLASSES[cls.__name__] = cls
    return cls


def _load_builtin_families() -> None:
    """Import every subpackage of `blocks`: each one is a family that registers itself."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    with _lock:
        if _builtins_loaded:
            return
        import blocks

        for module in pkgutil.iter_modules(blocks.__path__):
            if module.ispkg:
                importlib.import_module(f"blocks.{module.name}")
        _builtins_loaded = True


def families() -> dict[str, Family]:
    """Every registered family by name, built-in ones included."""
    _load_builtin_families()
    with _lock:
        return dict(sorted(_FAMILIES.items()))


def family_names() -> tuple[str, ...]:
    return tuple(families())


def get_family(name: str) -> Family:
    """The family called `name`; ValueError listing the known ones otherwise."""
    known = families()
    if name not in known:
        raise ValueError(f"unknown family {name!r}; known: {', '.join(known) or '(none)'}")
    return known[name]


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
    """Fresh blocks for a checkpoint, or an error listing the index classes known."""
    _load_builtin_families()
    with _lock:
        if index.blocks_class_name in _BLOCK_CLASSES:
            return _BLOCK_CLASSES[index.blocks_class_name]()
        # A checkpoint saved from a workflow-pruned pipeline names only
        # `SequentialPipelineBlocks`: its pipeline class's default blocks.
        pipeline_class = _PIPELINE_CLASSES.get(index.class_name or "")
        default = getattr(pipeline_class, "default_blocks_name", None)
        if default in _BLOCK_CLASSES:
            return _BLOCK_CLASSES[default]()
        for name in (index.blocks_class_name, index.class_name):
            family = _BY_CHECKPOINT_CLASS.get(name)
            if family is not None:
                if family.choose_blocks is not None:
                    return family.choose_blocks(index)()
                return family.checkpoint_classes[name]()
        known = sorted({*_BY_CHECKPOINT_CLASS, *_BLOCK_CLASSES, *_PIPELINE_CLASSES})
    raise ValueError(
        f"{index.source}: no blocks family for index class "
        f"{index.blocks_class_name or index.class_name!r}; known: {', '.join(known) or '(none)'}"
    )
