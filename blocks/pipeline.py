"""`ModularPipeline`: blocks plus the components and configs they run with.

The blocks say what is needed; the pipeline owns the objects (directly, or through a shared
`ComponentsManager`), loads what a workflow needs, moves models, and runs a call:

    pipe = ModularPipeline.from_pretrained("path/or/repo")
    pipe.load_components(dtype=torch.bfloat16)
    pipe.to("cuda")
    image = pipe(prompt="a red circle", num_inference_steps=4).images[0]

Deciding which family a checkpoint belongs to is `blocks.families`; reading indexes and
loading single components is `blocks.loading`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from blocks.block import ModularPipelineBlocks, run_block
from blocks.loading import (
    MODULAR_INDEX,
    CheckpointIndex,
    component_class_entry,
    load_component,
    read_index,
)
from blocks.lora.pipeline_methods import LoraPipelineMixin
from blocks.specs import ComponentSpec
from blocks.state import PipelineState

logger = logging.getLogger(__name__)

DtypeArg = torch.dtype | dict[str, torch.dtype] | None
StepCallback = Callable[[int, Any, Any], bool | None]


class ModularPipeline(LoraPipelineMixin):
    """Runs a copy of `blocks` with components loaded from a checkpoint or set by hand.

    LoRA adapters load and combine as in diffusers (`load_lora_weights`, `set_adapters`,
    `fuse_lora`, ...: `blocks.lora.pipeline_methods`)."""

    def __init__(
        self,
        blocks: ModularPipelineBlocks,
        pretrained_model_name_or_path: str | None = None,
        components_manager: Any = None,
        collection: str | None = None,
        index: CheckpointIndex | None = None,
        **hub_kwargs: Any,
    ) -> None:
        # A deep copy: editing the blocks a pipeline was made from must not change it.
        self._blocks = copy.deepcopy(blocks)
        self._manager = components_manager
        self._collection = collection
        self._hub_kwargs = hub_kwargs
        self._default_dtype: DtypeArg = None
        self._warned_kwargs: set[str] = set()
        self._progress_bar_config: dict[str, Any] = {}
        if index is None and pretrained_model_name_or_path is not None:
            index = read_index(pretrained_model_name_or_path, **hub_kwargs)
        self._index = index
        self._specs: dict[str, ComponentSpec] = {}
        self._components: dict[str, Any] = {}
        self._component_ids: dict[str, str] = {}  # ids in the components manager, if any
        self._configs: dict[str, Any] = {c.name: c.default for c in blocks.expected_configs}
        for spec in blocks.expected_components:
            self._specs[spec.name] = index.resolve(spec) if index else spec
            self._components[spec.name] = None
        if index is not None:
            self._configs.update(
                {k: v for k, v in index.configs.items() if k in self._configs}
            )
        for name, spec in self._specs.items():
            if spec.default_creation_method == "from_config":
                self._set_component(name, self._create_from_config(spec))

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str,
        components_manager: Any = None,
        collection: str | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        **hub_kwargs: Any,
    ) -> ModularPipeline:
        """A pipeline for a checkpoint: its family's blocks and specs; no weights loaded yet."""
        from blocks.families import blocks_for_index
        from blocks.hub_blocks import has_custom_blocks, load_custom_blocks

        if has_custom_blocks(pretrained_model_name_or_path, revision=revision, **hub_kwargs):
            blocks = load_custom_blocks(
                pretrained_model_name_or_path, trust_remote_code=trust_remote_code,
                revision=revision, **hub_kwargs
            )
            return cls(blocks, None, components_manager, collection)
        index = read_index(pretrained_model_name_or_path, revision=revision, **hub_kwargs)
        blocks = blocks_for_index(index)
        return cls(
            blocks,
            pretrained_model_name_or_path,
            components_manager=components_manager,
            collection=collection,
            index=index,
            **hub_kwargs,
        )

    def _create_from_config(self, spec: ComponentSpec) -> Any:
        """Weight-free components: from the checkpoint's subfolder config where it has one."""
        if self._index is not None and spec.name in self._index.components:
            return load_component(
                spec, self._index.component_classes.get(spec.name), None, **self._hub_kwargs
            )
        return spec.create()

    # -- components and configs -------------------------------------------------------------

    @property
    def blocks(self) -> ModularPipelineBlocks:
        """A copy of the blocks this pipeline runs (edit it and `init_pipeline` anew)."""
        return copy.deepcopy(self._blocks)

    @property
    def components(self) -> dict[str, Any]:
        """Every expected component by name; None where not loaded."""
        return dict(self._components)

    @property
    def component_specs(self) -> dict[str, ComponentSpec]:
        return dict(self._specs)

    @property
    def config(self) -> dict[str, Any]:
        return dict(self._configs)

    @property
    def null_component_names(self) -> list[str]:
        return [name for name, value in self._components.items() if value is None]

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: components and configs read as attributes,
        # which is how blocks use `components.vae` or `components.is_distilled`.
        data = self.__dict__
        if "_components" in data and name in data["_components"]:
            return data["_components"][name]
        if "_configs" in data and name in data["_configs"]:
            return data["_configs"][name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def _set_component(self, name: str, value: Any, load_id: str | None = None) -> Any:
        """Store a component, going through the manager so shared weights are one object."""
        if value is not None and self._manager is not None:
            component_id = self._manager.add(
                name, value, collection=self._collection, load_id=load_id
            )
            value = self._manager.get(component_id)
            self._component_ids[name] = component_id
        self._components[name] = value
        return value

    def update_components(self, **components_or_configs: Any) -> None:
        """Replace components (e.g. `scheduler=EulerDiscreteScheduler(...)`) or configs."""
        for name, value in components_or_configs.items():
            if name in self._specs:
                spec = self._specs[name]
                # A hand-set object no longer comes from the checkpoint's subfolder.
                self._specs[name] = ComponentSpec(
                    name, type(value), spec.description,
                    default_creation_method=spec.default_creation_method,
                )
                self._set_component(name, value)
            elif name in self._configs:
                self._configs[name] = value
            else:
                valid = ", ".join([*self._specs, *self._configs])
                raise ValueError(
                    f"update_components: {name!r} is neither a component nor a config of "
                    f"{type(self._blocks).__name__}; valid: {valid}"
                )

    def load_components(
        self,
        names: str | Iterable[str] | None = None,
        workflow: str | None = None,
        dtype: DtypeArg = None,
        device: str | torch.device | None = None,
        torch_dtype: DtypeArg = None,
    ) -> ModularPipeline:
        """Load the named components, those `workflow` needs, or all with a source.

        `dtype` is one dtype or a dict by component name with a `"default"` entry
        (`torch_dtype` is accepted as an alias, as diffusers spells it).
        """
        dtype = dtype if dtype is not None else torch_dtype
        self._default_dtype = dtype
        for name in self._names_to_load(names, workflow):
            self._load_one(name, _dtype_for(dtype, name))
        if device is not None:
            self.to(device)
        return self

    def _names_to_load(self, names: str | Iterable[str] | None, workflow: str | None) -> list[str]:
        if names is not None and workflow is not None:
            raise ValueError("load_components: pass names or workflow, not both")
        pretrained = [
            name for name, spec in self._specs.items()
            if spec.default_creation_method == "from_pretrained"
        ]
        if workflow is not None:
            needed = self._blocks.get_workflow(workflow).component_names
            return [name for name in pretrained if name in needed]
        if names is None:
            return [n for n in pretrained if self._specs[n].pretrained_model_name_or_path]
        names = [names] if isinstance(names, str) else list(names)
        unknown = [name for name in names if name not in self._specs]
        if unknown:
            raise ValueError(
                f"load_components: unknown component(s) {unknown}; valid: {list(self._specs)}"
            )
        return names

    def _load_one(self, name: str, dtype: torch.dtype | None) -> Any:
        spec = self._specs[name]
        index_class = self._index.component_classes.get(name) if self._index else None
        component = load_component(spec, index_class, dtype, **self._hub_kwargs)
        return self._set_component(name, component, load_id=spec.load_id)

    def unload_components(self, names: str | Iterable[str] | None = None) -> None:
        """Drop components (all loaded ones by default).

        With a components manager and a collection, the component leaves the collection and
        the manager drops it once no collection holds it; without a collection the manager
        keeps it, since it cannot know whether another pipeline still uses it.
        """
        names = list(self._components) if names is None else (
            [names] if isinstance(names, str) else list(names)
        )
        for name in names:
            component_id = self._component_ids.pop(name, None)
            if component_id is not None and self._collection is not None:
                self._manager.remove_from_collection(component_id, self._collection)
                if not any(component_id in ids for ids in self._manager.collections.values()):
                    self._manager.remove(component_id)
            self._components[name] = None

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        """Move (and optionally cast) every model component; returns the pipeline."""
        # Only what is given: diffusers' `to` warns about float32 modules whenever a `dtype`
        # keyword is present, even None.
        moves = {key: value for key, value in (("device", device), ("dtype", dtype))
                 if value is not None}
        for component in self._components.values():
            if isinstance(component, torch.nn.Module) and moves:
                component.to(**moves)
        return self

    @property
    def _execution_device(self) -> torch.device:
        managed = self._manager.execution_device if self._manager is not None else None
        if managed is not None:
            return managed
        for component in self._components.values():
            if isinstance(component, torch.nn.Module):
                for tensor in component.parameters():
                    return tensor.device
        return torch.device("cpu")

    @property
    def device(self) -> torch.device:
        return self._execution_device

    @property
    def dtype(self) -> torch.dtype:
        for component in self._components.values():
            if isinstance(component, torch.nn.Module):
                for tensor in component.parameters():
                    return tensor.dtype
        return torch.float32

    @contextlib.contextmanager
    def use_components(self, names: Iterable[str]) -> Iterator[None]:
        """Make the named components ready for a block: loaded (from their source when
        missing) and, under a manager with auto offload, on the device and not evictable."""
        objects = []
        for name in names:
            component = self._components.get(name)
            if component is None:
                component = self._load_missing(name)
            objects.append(component)
        if self._manager is None:
            yield
            return
        with self._manager.using(objects):
            yield

    def _load_missing(self, name: str) -> Any:
        spec = self._specs.get(name)
        if spec is None or spec.pretrained_model_name_or_path is None:
            raise ValueError(
                f"component {name!r} is not loaded and has no source; set it with "
                f"pipe.update_components({name}=...) or load a checkpoint"
            )
        logger.info("loading component %r on first use", name)
        return self._load_one(name, _dtype_for(self._default_dtype, name))

    # -- saving ------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | Path) -> None:
        """Write every loaded component (safetensors) and a `modular_model_index.json`."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        index: dict[str, Any] = {
            "_blocks_class_name": type(self._blocks).__name__,
            "_class_name": "ModularPipeline",
            **self._configs,
        }
        for name, component in self._components.items():
            if component is None:
                continue
            if not hasattr(component, "save_pretrained"):
                raise ValueError(f"save_pretrained: component {name!r} cannot be saved")
            component.save_pretrained(str(folder / name))
            spec = self._specs[name]
            library, class_name = component_class_entry(component)
            index[name] = [
                library,
                class_name,
                {"pretrained_model_name_or_path": None, "subfolder": name,
                 "variant": None, "revision": None,
                 "default_creation_method": spec.default_creation_method},
            ]
        (folder / MODULAR_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    # -- running -----------------------------------------------------------------------------

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """tqdm options for the denoise progress bar, e.g. `disable=True`."""
        self._progress_bar_config = dict(kwargs)

    def progress_bar(self, total: int) -> tqdm:
        return tqdm(total=total, **self._progress_bar_config)

    def __call__(
        self,
        state: PipelineState | None = None,
        output: str | list[str] | None = None,
        callback_on_step_end: StepCallback | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the blocks. Returns the final state, one value (`output="images"`) or a dict
        of values (`output=[...]`). A passed `state` is copied, never mutated.

        `callback_on_step_end(step, timestep, block_state)` runs after every denoising step;
        returning True stops the call with `GenerationCancelled`.
        """
        state = PipelineState() if state is None else state.copy()
        known = {p.name for p in self._blocks.inputs if p.name is not None}
        kinds = {p.name: p.kwargs_type for p in self._blocks.inputs if p.name is not None}
        for key, value in kwargs.items():
            if key not in known:
                self._warn_unknown(key, known)
            state.set(key, value, kinds.get(key))
        if callback_on_step_end is not None:
            state.step_callback = callback_on_step_end
        with torch.inference_mode():
            _, state = run_block(self._blocks, None, self, state)
        if output is None:
            return state
        if isinstance(output, str):
            return state.get(output)
        return {name: state.get(name) for name in output}

    def _warn_unknown(self, key: str, known: set[str]) -> None:
        if key in self._warned_kwargs:
            return
        self._warned_kwargs.add(key)
        warnings.warn(
            f"{type(self._blocks).__name__} does not use input {key!r}; it is ignored. "
            f"Inputs: {', '.join(sorted(known))}",
            UserWarning,
            stacklevel=3,
        )

    def __repr__(self) -> str:
        loaded = {n: type(c).__name__ for n, c in self._components.items() if c is not None}
        return (
            f"ModularPipeline(blocks={type(self._blocks).__name__}, components={loaded}, "
            f"missing={self.null_component_names}, configs={self._configs})"
        )


def _dtype_for(dtype: DtypeArg, name: str) -> torch.dtype | None:
    if isinstance(dtype, dict):
        return dtype.get(name, dtype.get("default"))
    return dtype
