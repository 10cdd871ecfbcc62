"""Declarations a block makes about itself: the components it needs, its configs, its inputs
and its outputs.

These are plain data. A block lists them at the top of its class; composites merge them; the
pipeline reads them to know what to load, what to ask the user for and what a block returns.
Merging follows diffusers' rules, so the same blocks declare the same contract in both
libraries: the first declaration of an input wins, and where the branches of a conditional
block declare different defaults the merged input has none and records each branch's
(`defaults_by_block`), each branch applying its own when it runs.

Not handled here: reading files. `ComponentSpec.load` hands that to `blocks.loading`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

CreationMethod = Literal["from_pretrained", "from_config"]

# The fields that say where a component's weights come from, in load-id order.
LOADING_FIELDS = ("pretrained_model_name_or_path", "subfolder", "variant", "revision")
# Attribute a loaded component carries with its load id, under the name diffusers reads, so a
# component loaded by either library keeps its source when handed to the other.
LOAD_ID_ATTRIBUTE = "_diffusers_load_id"
NO_LOAD_ID = "null"


@dataclass
class ComponentSpec:
    """A component a block needs: its name, its class and where its weights come from.

    `default_creation_method="from_config"` is for weight-free components (schedulers, image
    processors, guiders): the pipeline creates those itself from `config` (or from the
    checkpoint's subfolder config, where one is given). `"from_pretrained"` components are
    loaded by `ModularPipeline.load_components`, or by `spec.load()`.
    """

    name: str | None = None
    type_hint: type | None = None
    description: str = ""
    config: dict[str, Any] | None = None
    pretrained_model_name_or_path: str | None = None
    subfolder: str = ""
    variant: str | None = None
    revision: str | None = None
    default_creation_method: CreationMethod = "from_pretrained"

    def __post_init__(self) -> None:
        if self.default_creation_method not in ("from_pretrained", "from_config"):
            raise ValueError(
                f"ComponentSpec {self.name!r}: default_creation_method must be 'from_pretrained' "
                f"or 'from_config', got {self.default_creation_method!r}"
            )

    @classmethod
    def loading_fields(cls) -> list[str]:
        return list(LOADING_FIELDS)

    @property
    def load_id(self) -> str | None:
        """`repo|subfolder|variant|revision`: the identity used to share loaded weights."""
        if self.pretrained_model_name_or_path is None:
            return None
        parts = (self.pretrained_model_name_or_path, self.subfolder, self.variant, self.revision)
        return "|".join("null" if p is None else str(p) for p in parts)

    @classmethod
    def decode_load_id(cls, load_id: str) -> dict[str, str | None]:
        """The loading fields a load id was made of (all None for `"null"`)."""
        decoded: dict[str, str | None] = dict.fromkeys(LOADING_FIELDS)
        if load_id == NO_LOAD_ID:
            return decoded
        for field_name, part in zip(LOADING_FIELDS, load_id.split("|"), strict=False):
            decoded[field_name] = None if part == "null" else part
        return decoded

    @classmethod
    def from_component(cls, name: str, component: Any) -> ComponentSpec:
        """The spec that recreates `component`: its source when it was loaded from one (it
        carries a load id), else its config for a weight-free object such as a scheduler."""
        import torch

        load_id = getattr(component, LOAD_ID_ATTRIBUTE, None)
        if load_id is not None and load_id != NO_LOAD_ID:
            source = {k: v for k, v in cls.decode_load_id(load_id).items() if v is not None}
            return cls(name, type(component), **source)
        if isinstance(component, torch.nn.Module):
            raise ValueError(
                f"ComponentSpec.from_component: {name!r} is a {type(component).__name__} with no "
                "record of where it was loaded from; load it with ComponentSpec.load() or "
                "pipe.load_components() so its source is known"
            )
        config = getattr(component, "config", None)
        if config is None:
            raise ValueError(
                f"ComponentSpec.from_component: {name!r} ({type(component).__name__}) has neither "
                "a load id nor a config to be recreated from"
            )
        return cls(name, type(component), config=dict(config),
                   default_creation_method="from_config")

    def merged(self, other: ComponentSpec) -> ComponentSpec:
        """This spec with every field `other` sets (not None / not empty) taken from `other`."""
        updates = {
            f.name: getattr(other, f.name)
            for f in fields(other)
            if getattr(other, f.name) not in (None, "", {})
            and f.name not in ("name", "default_creation_method")
        }
        return replace(self, **updates)

    def create(self, config: dict[str, Any] | None = None, **overrides: Any) -> Any:
        """Create a weight-free component from `config` (else this spec's), its class's
        defaults where unset."""
        if self.type_hint is None:
            raise ValueError(f"component {self.name!r}: cannot create it without a type_hint")
        merged = {**(config or self.config or {}), **overrides}
        if hasattr(self.type_hint, "from_config"):
            component = self.type_hint.from_config(merged)
        else:
            component = self.type_hint(**merged)
        tag_load_id(component, NO_LOAD_ID)
        return component

    def load(self, **kwargs: Any) -> Any:
        """Load this component from its source (`from_pretrained`); a loading field passed
        here (`pretrained_model_name_or_path`, `subfolder`, `variant`, `revision`) overrides
        the spec's and is kept in it. `dtype` casts models; other keywords go to the class's
        `from_pretrained`. The component remembers its load id (see `from_component`)."""
        from blocks.loading import load_component

        dtype = _one_dtype(kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None))
        overrides = {key: kwargs.pop(key) for key in LOADING_FIELDS if key in kwargs}
        spec = replace(self, **overrides)
        if spec.pretrained_model_name_or_path is None:
            raise ValueError(
                f"ComponentSpec.load: {self.name!r} has no pretrained_model_name_or_path; set it "
                "on the spec or pass it to load()"
            )
        component = load_component(spec, None, dtype, load_kwargs=kwargs)
        for key, value in overrides.items():
            setattr(self, key, value)
        if self.type_hint is None:
            self.type_hint = type(component)
        tag_load_id(component, spec.load_id)
        return component


def tag_load_id(component: Any, load_id: str | None) -> None:
    """Remember where `component` was loaded from (objects that refuse attributes are skipped:
    they are then treated as having no source)."""
    with contextlib.suppress(AttributeError, TypeError):
        setattr(component, LOAD_ID_ATTRIBUTE, load_id or NO_LOAD_ID)


def _one_dtype(dtype: Any, torch_dtype: Any) -> Any:
    if torch_dtype is None:
        return dtype
    if dtype is not None:
        raise ValueError(
            "ComponentSpec.load: you passed both `dtype` and `torch_dtype`; pass `dtype` only"
        )
    import warnings

    warnings.warn("ComponentSpec.load: `torch_dtype` is deprecated, pass `dtype`",
                  FutureWarning, stacklevel=3)
    return torch_dtype


@dataclass
class ConfigSpec:
    """A plain configuration value of a pipeline (e.g. `is_distilled`) with its default."""

    name: str
    default: Any = None
    description: str = ""


@dataclass(frozen=True)
class InputParam:
    """An input a block reads from the pipeline state.

    `required=True` means the value must be present (not None) when the block runs, whatever
    `default` says. With `kwargs_type` and no `name`, the block receives every state value
    tagged with that kwargs type, as a dict attribute named after the kwargs type and as
    attributes of their own names. `defaults_by_block` is set on merged inputs whose branches
    disagree on the default (see `combine_inputs`). `metadata` is free-form, e.g.
    `{"mellon": "slider"}` for `blocks.mellon`.
    """

    name: str | None = None
    type_hint: Any = None
    default: Any = None
    required: bool = False
    description: str = ""
    kwargs_type: str | None = None
    metadata: dict[str, Any] | None = None
    defaults_by_block: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.name is None and self.kwargs_type is None:
            raise ValueError("InputParam needs a name, a kwargs_type, or both")

    @property
    def key(self) -> str:
        """A name for merging and error messages: the name, else `**kwargs_type`."""
        return self.name if self.name is not None else f"**{self.kwargs_type}"


@dataclass(frozen=True)
class OutputParam:
    """A value a block writes to the pipeline state; `kwargs_type` tags it for consumers that
    collect a whole group of values (e.g. `denoiser_input_fields`)."""

    name: str
    type_hint: Any = None
    description: str = ""
    kwargs_type: str | None = None
    metadata: dict[str, Any] | None = None


def merge_inputs(groups: list[list[InputParam]]) -> list[InputParam]:
    """Ordered union of the inputs of blocks that run one after another.

    The first declaration wins, its default included: a later block that declares the same
    input with another default gets the first one's value from the state (and applies its own
    default only where the first has none). A later `required=True`, type hint or description
    completes the merged entry, which changes only what the contract reports.
    """
    merged: dict[str, InputParam] = {}
    for group in groups:
        for param in group:
            seen = merged.get(param.key)
            if seen is None:
                merged[param.key] = param
                continue
            updates: dict[str, Any] = {}
            if param.required and not seen.required:
                updates["required"] = True
            if seen.type_hint is None and param.type_hint is not None:
                updates["type_hint"] = param.type_hint
            if not seen.description and param.description:
                updates["description"] = param.description
            if updates:
                merged[param.key] = replace(seen, **updates)
    return list(merged.values())


def combine_inputs(*named_inputs: tuple[str, list[InputParam]]) -> list[InputParam]:
    """Ordered union of the inputs of alternative branches, `(branch name, inputs)` each.

    The first declaration wins. Where branches declare different defaults (None counts as one)
    the merged input's default is None and `defaults_by_block` maps every branch to its own;
    a nested conditional's entries are prefixed with its name (`image.img2img`).
    """
    merged: dict[str, InputParam] = {}
    per_block: dict[str, dict[str, Any]] = {}
    for block_name, inputs in named_inputs:
        for param in inputs:
            if param.defaults_by_block:
                defaults = {f"{block_name}.{k}": v for k, v in param.defaults_by_block.items()}
            else:
                defaults = {block_name: param.default}
            if param.key not in merged:
                merged[param.key] = param
                per_block[param.key] = defaults
                continue
            recorded = per_block[param.key]
            recorded.update(defaults)
            values = list(recorded.values())
            if any(value != values[0] for value in values[1:]):
                merged[param.key] = replace(
                    merged[param.key], default=None, defaults_by_block=dict(recorded)
                )
    return list(merged.values())


def merge_by_name(groups: list[list[Any]]) -> list[Any]:
    """Ordered union of outputs, component specs or config specs by `name`; first one wins."""
    merged: dict[str, Any] = {}
    for group in groups:
        for item in group:
            merged.setdefault(item.name, item)
    return list(merged.values())
