"""diffusers' LoRA methods on `ModularPipeline`: load, choose, weigh, fuse and unload adapters.

    pipe.load_lora_weights("path/or/repo", weight_name="pixel.safetensors", adapter_name="pixel")
    pipe.load_lora_weights(kohya_state_dict, adapter_name="ink")
    pipe.set_adapters(["pixel", "ink"], adapter_weights=[0.8, 0.5])
    pipe.fuse_lora(); pipe.unfuse_lora(); pipe.disable_lora(); pipe.unload_lora_weights()

The semantics are diffusers': loading an adapter makes it the only active one in the models it
adapts; `adapter_weights` may be one float, one per adapter, or per component
(`{"unet": 0.8, "text_encoder": 0.5}`); `fuse_lora` merges the active (or named) adapters into
the weights until `unfuse_lora`; `unload_lora_weights` drops every adapter but keeps what was
fused. Adapters attach to the model objects (the denoiser `unet` or `transformer`, and the text
encoders), so pipelines sharing a model through a `ComponentsManager` share its adapters.

Not handled here: key formats (`blocks.lora.keys`), per-request adapter sets
(`blocks.lora.selection`), per-block scales inside one component (diffusers' nested dicts):
they are refused with a message.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from blocks.lora.files import LoraFile, read_lora_file
from blocks.lora.keys import COMPONENT_PREFIXES, parse_lora
from blocks.lora.layers import ModelLoras, model_loras

AdapterWeight = float | Mapping[str, float]


class _LoraComponents(Mapping):
    """The pipeline's components a LoRA may adapt, loaded on first access."""

    def __init__(self, pipeline: Any, only: Sequence[str] | None = None) -> None:
        self._pipeline = pipeline
        self._names = [name for name in COMPONENT_PREFIXES if name in pipeline.component_specs
                       and (only is None or name in only)]

    def __getitem__(self, name: str) -> Any:
        if name not in self._names:
            raise KeyError(name)
        component = self._pipeline.components.get(name)
        return component if component is not None else self._pipeline._load_missing(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class LoraPipelineMixin:
    """LoRA methods of `ModularPipeline` (module docstring)."""

    def _adapted_models(self) -> dict[str, ModelLoras]:
        components = self.components  # type: ignore[attr-defined]
        found = {}
        for name in COMPONENT_PREFIXES:
            loras = model_loras(components.get(name))
            if loras is not None and loras.adapters:
                found[name] = loras
        return found

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor]
        | LoraFile,
        adapter_name: str | None = None,
        weight_name: str | None = None,
        components: Sequence[str] | None = None,
        **hub_kwargs: Any,
    ) -> None:
        """Load a LoRA (diffusers/peft or kohya keys) into the denoiser and text encoders it
        has weights for, as `adapter_name` (default `default_<n>`), and make it the active
        adapter of those models. `components` (not in diffusers): only into these, the
        file's other weights skipped (a process holding some of the pipeline's models)."""
        file = read_lora_file(pretrained_model_name_or_path_or_dict, weight_name, **hub_kwargs)
        adaptable = _LoraComponents(self, components)
        per_component = parse_lora(file, adaptable, only_these=components is not None)
        loaded = self.get_list_adapters()
        if adapter_name is None:
            adapter_name = f"default_{len({n for names in loaded.values() for n in names})}"
        if any(adapter_name in names for names in loaded.values()):
            raise ValueError(f"load_lora_weights: adapter name {adapter_name!r} is already in "
                             "use; pick another or delete_adapters() it first")
        for component, modules in per_component.items():
            loras = model_loras(adaptable[component], component, create=True)
            loras.add(adapter_name, modules)  # type: ignore[union-attr]
            loras.active = {adapter_name: 1.0}  # type: ignore[union-attr]

    def get_list_adapters(self) -> dict[str, list[str]]:
        """Loaded adapters per component."""
        return {name: list(loras.adapters) for name, loras in self._adapted_models().items()}

    def get_active_adapters(self) -> list[str]:
        """Adapters active in any component, in order."""
        names: dict[str, None] = {}
        for loras in self._adapted_models().values():
            names.update(dict.fromkeys(loras.active))
        return list(names)

    def set_adapters(
        self,
        adapter_names: str | Sequence[str],
        adapter_weights: AdapterWeight | Sequence[AdapterWeight | None] | None = None,
    ) -> None:
        """Make `adapter_names` the active adapters, weighted by `adapter_weights` (one value,
        one per adapter, each a float or `{component: float}`; default 1.0)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if isinstance(adapter_weights, Sequence) and not isinstance(adapter_weights, str):
            weights = list(adapter_weights)
            if len(weights) != len(names):
                raise ValueError(f"set_adapters: {len(names)} adapter(s) but "
                                 f"{len(weights)} weight(s)")
        else:
            weights = [adapter_weights] * len(names)
        models = self._adapted_models()
        loaded = {name for loras in models.values() for name in loras.adapters}
        unknown = [name for name in names if name not in loaded]
        if unknown:
            raise ValueError(f"set_adapters: adapter(s) {unknown} are not loaded; loaded: "
                             f"{sorted(loaded) or 'none'}")
        for component, loras in models.items():
            active = {}
            for name, weight in zip(names, weights, strict=True):
                if name in loras.adapters:
                    active[name] = _component_weight(weight, component)
            loras.active = active

    def disable_lora(self) -> None:
        """Run without adapters (they stay loaded; `enable_lora` brings them back)."""
        for loras in self._adapted_models().values():
            loras.enabled = False

    def enable_lora(self) -> None:
        for loras in self._adapted_models().values():
            loras.enabled = True

    def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for loras in self._adapted_models().values():
            for name in names:
                loras.delete(name)

    def unload_lora_weights(self) -> None:
        """Drop every adapter (what `fuse_lora` merged stays in the weights)."""
        for name in COMPONENT_PREFIXES:
            loras = model_loras(self.components.get(name))  # type: ignore[attr-defined]
            if loras is not None:
                loras.remove_all()

    def fuse_lora(
        self,
        components: Sequence[str] | None = None,
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: Sequence[str] | None = None,
    ) -> None:
        """Merge the active adapters (or `adapter_names`), times `lora_scale`, into the weights
        of `components` (default: every adapted one). `unfuse_lora` restores them exactly."""
        models = self._adapted_models()
        chosen = models if components is None else {c: models[c] for c in components
                                                    if c in models}
        for loras in chosen.values():
            if adapter_names is None:
                weights = {name: w * lora_scale for name, w in loras.active.items()}
            else:
                weights = {name: loras.active.get(name, 1.0) * lora_scale
                           for name in adapter_names if name in loras.adapters}
            loras.fuse(weights, safe_fusing)

    def unfuse_lora(self, components: Sequence[str] | None = None) -> None:
        for component, loras in self._adapted_models().items():
            if components is None or component in components:
                loras.unfuse()


def _component_weight(weight: AdapterWeight | None, component: str) -> float:
    if weight is None:
        return 1.0
    if isinstance(weight, Mapping):
        value = weight.get(component, 1.0)
        if isinstance(value, Mapping):
            raise ValueError(f"set_adapters: per-block weights for {component!r} are not "
                             "supported; give one float per component")
        return float(value)
    return float(weight)
