"""Declarations a block makes about itself: the components it needs, its configs, its inputs
and its outputs.

These are plain data. A block lists them at the top of its class; composites merge them; the
pipeline reads them to know what to load, what to ask the user for and what a block returns.
Loading the weights a `ComponentSpec` points at is done by `blocks.loading`, not here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Literal

CreationMethod = Literal["from_pretrained", "from_config"]


@dataclass
class ComponentSpec:
    """A component a block needs: its name, its class and where its weights come from.

    `default_creation_method="from_config"` is for weight-free components (schedulers, image
    processors, guiders): the pipeline creates those itself from `config` (or from the
    checkpoint's subfolder config, where one is given). `"from_pretrained"` components are
    loaded by `ModularPipeline.load_components`.
    """

    name: str
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

    @property
    def load_id(self) -> str | None:
        """`repo|subfolder|variant|revision`: the identity used to share loaded weights."""
        if self.pretrained_model_name_or_path is None:
            return None
        parts = (self.pretrained_model_name_or_path, self.subfolder, self.variant, self.revision)
        return "|".join("null" if p is None else str(p) for p in parts)

    def merged(self, other: ComponentSpec) -> ComponentSpec:
        """This spec with every field `other` sets (not None / not empty) taken from `other`."""
        updates = {
            f.name: getattr(other, f.name)
            for f in fields(other)
            if getattr(other, f.name) not in (None, "", {})
            and f.name not in ("name", "default_creation_method")
        }
        return replace(self, **updates)

    def create(self, **config_overrides: Any) -> Any:
        """Create a weight-free component from `config` (its class's defaults where unset)."""
        if self.type_hint is None:
            raise ValueError(f"component {self.name!r}: cannot create it without a type_hint")
        config = {**(self.config or {}), **config_overrides}
        if hasattr(self.type_hint, "from_config"):
            return self.type_hint.from_config(config)
        return self.type_hint(**config)


@dataclass(frozen=True)
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
    attributes of their own names.
    """

    name: str | None
    type_hint: Any = None
    default: Any = None
    required: bool = False
    description: str = ""
    kwargs_type: str | None = None

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


def merge_inputs(groups: list[list[InputParam]]) -> list[InputParam]:
    """Ordered union of several blocks' inputs: first declaration wins, except that a later
    `required=True` or a later non-None default upgrades the merged entry."""
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
            if seen.default is None and param.default is not None:
                updates["default"] = param.default
            if seen.type_hint is None and param.type_hint is not None:
                updates["type_hint"] = param.type_hint
            if not seen.description and param.description:
                updates["description"] = param.description
            if updates:
                merged[param.key] = replace(seen, **updates)
    return list(merged.values())


def merge_by_name(groups: list[list[Any]]) -> list[Any]:
    """Ordered union of outputs, component specs or config specs by `name`; first one wins."""
    merged: dict[str, Any] = {}
    for group in groups:
        for item in group:
            merged.setdefault(item.name, item)
    return list(merged.values())
