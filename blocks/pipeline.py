"""`ModularPipeline`: blocks plus the components and configs they run with.

The blocks say what is needed; the pipeline owns the objects (directly, or through a shared
`ComponentsManager`), loads what a workflow needs, moves models, and runs a call:

    pipe = ModularPipeline.from_pretrained("path/or/repo")
    pipe.load_components(dtype=torch.bfloat16)
    pipe.to("cuda")
    image = pipe(prompt="a red circle", num_inference_steps=4).images[0]

It behaves as diffusers' `ModularPipeline` does for the same calls: a call puts every input
the blocks declare into the state (the value passed, else its default), `load_components`
skips what is loaded and warns about what fails (`strict=True` raises instead), components
keep their source through `update_components`, and `save_pretrained` writes a
`modular_model_index.json` that diffusers reads. The README lists where we differ on purpose.

Not handled here: which family a checkpoint belongs to (`blocks.families`), reading indexes
and loading single components (`blocks.loading`), the model card text (`blocks.model_card`).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from blocks.block import ModularPipelineBlocks, run_block
from blocks.loading import (
    MODULAR_INDEX,
    CheckpointIndex,
    ComponentLoadError,
    component_class_entry,
    load_component,
    read_index,
)
from blocks.lora.pipeline_methods import LoraPipelineMixin
from blocks.specs import (
    LOAD_ID_ATTRIBUTE,
    LOADING_FIELDS,
    NO_LOAD_ID,
    ComponentSpec,
    tag_load_id,
)
from blocks.state import PipelineState

logger = logging.getLogger(__name__)

DtypeArg = torch.dtype | dict[str, torch.dtype] | None
StepCallback = Callable[[int, Any, Any], bool | None]


class ModularPipeline(LoraPipelineMixin):
    """Runs a copy of `blocks` with components loaded from a checkpoint or set by hand.

    Without `blocks`, the checkpoint's index names them (or, for a family's pipeline class,
    its `default_blocks_name`); `workflow` prunes them to that workflow's blocks, so only the
    components it uses are expected and loaded. LoRA adapters load and combine as in diffusers
    (`load_lora_weights`, `set_adapters`, `fuse_lora`, ...: `blocks.lora.pipeline_methods`).
    """

    # The blocks class a family's pipeline runs when nothing else names one.
    default_blocks_name: str | None = None

    def __init__(
        self,
        blocks: ModularPipelineBlocks | None = None,
        pretrained_model_name_or_path: str | None = None,
        components_manager: Any = None,
        collection: str | None = None,
        workflow: str | None = None,
        index: CheckpointIndex | None = None,
        **hub_kwargs: Any,
    ) -> None:
        revision = hub_kwargs.pop("revision", None)
        if index is None and pretrained_model_name_or_path is not None:
            index = read_index(pretrained_model_name_or_path, revision=revision, **hub_kwargs)
        if blocks is None:
            blocks = self._default_blocks(index)
        if workflow is not None:
            blocks = blocks.get_workflow(workflow)
        # A deep copy: editing the blocks a pipeline was made from must not change it.
        self._blocks = copy.deepcopy(blocks)
        self._manager = components_manager
        self._collection = collection
        self._hub_kwargs = hub_kwargs
        self._pretrained_model_name_or_path = (
            str(pretrained_model_name_or_path) if pretrained_model_name_or_path is not None
            else None
        )
        self._default_dtype: DtypeArg = None
        self._warned_kwargs: set[str] = set()
        self._progress_bar_config: dict[str, Any] = {}
        self._index = index
        self._component_specs: dict[str, ComponentSpec] = {}
        self._components: dict[str, Any] = {}
        self._component_ids: dict[str, str] = {}  # ids in the components manager, if any
        self._configs: dict[str, Any] = {c.name: c.default for c in blocks.expected_configs}
        for spec in blocks.expected_components:
            self._component_specs[spec.name] = index.resolve(spec) if index else copy.copy(spec)
            self._components[spec.name] = None
        if index is not None:
            self._configs.update(
                {k: v for k, v in index.configs.items() if k in self._configs}
            )
        for name, spec in self._component_specs.items():
            if spec.default_creation_method == "from_config":
                self._set_component(name, self._create_from_config(spec))

    def _default_blocks(self, index: CheckpointIndex | None) -> ModularPipelineBlocks:
        from blocks.families import blocks_class_named, blocks_for_index

        if index is not None:
            return blocks_for_index(index)
        blocks_class = blocks_class_named(self.default_blocks_name)
        if blocks_class is None:
            raise ValueError(
                f"{type(self).__name__}: pass blocks, or a checkpoint whose index names them"
            )
        return blocks_class()

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str,
        trust_remote_code: bool = False,
        components_manager: Any = None,
        collection: str | None = None,
        workflow: str | None = None,
        revision: str | None = None,
        **hub_kwargs: Any,
    ) -> ModularPipeline:
        """A pipeline for a checkpoint: its family's blocks (or the custom blocks its
        `modular_config.json` defines, with `trust_remote_code=True`) and specs from its index;
        no weights loaded yet. `workflow` prunes the blocks to that workflow."""
        from blocks.hub_blocks import has_custom_blocks, load_custom_blocks
        from blocks.loading import DIFFUSERS_INDEX, resolve_files

        source = str(pretrained_model_name_or_path)
        blocks = None
        if has_custom_blocks(source, revision=revision, **hub_kwargs):
            blocks = load_custom_blocks(
                source, trust_remote_code=trust_remote_code, revision=revision, **hub_kwargs
            )
        index = None
        folder = resolve_files(source, [MODULAR_INDEX, DIFFUSERS_INDEX], revision=revision,
                               **hub_kwargs)
        if blocks is None or any((folder / f).is_file() for f in (MODULAR_INDEX, DIFFUSERS_INDEX)):
            index = read_index(source, revision=revision, **hub_kwargs)
        pipeline_class = cls if cls is not ModularPipeline else _pipeline_class(blocks, index)
        return pipeline_class(
            blocks,
            source if index is not None else None,
            components_manager=components_manager,
            collection=collection,
            workflow=workflow,
            index=index,
            revision=revision,
            **hub_kwargs,
        )

    def _create_from_config(self, spec: ComponentSpec) -> Any:
        """Weight-free components: from the checkpoint's subfolder config where it has one."""
        if self._index is not None and spec.name in self._index.components:
            component = load_component(
                spec, self._index.component_classes.get(spec.name), None, **self._hub_kwargs
            )
            tag_load_id(component, NO_LOAD_ID)
            return component
        return spec.create()

    # -- components and configs -------------------------------------------------------------

    @property
    def blocks(self) -> ModularPipelineBlocks:
        """A copy of the blocks this pipeline runs (edit it and `init_pipeline` anew)."""
        return copy.deepcopy(self._blocks)

    @property
    def doc(self) -> str:
        return self._blocks.doc

    @property
    def components(self) -> dict[str, Any]:
        """Every expected component by name; None where not loaded."""
        return dict(self._components)

    @property
    def component_names(self) -> list[str]:
        return list(self._components)

    @property
    def pretrained_component_names(self) -> list[str]:
        """Components loaded from weights (`default_creation_method="from_pretrained"`)."""
        return [n for n, s in self._component_specs.items()
                if s.default_creation_method == "from_pretrained"]

    @property
    def config_component_names(self) -> list[str]:
        """Components the pipeline creates from a config (schedulers, processors)."""
        return [n for n, s in self._component_specs.items()
                if s.default_creation_method == "from_config"]

    @property
    def component_specs(self) -> dict[str, ComponentSpec]:
        return dict(self._component_specs)

    def get_component_spec(self, name: str) -> ComponentSpec:
        """A copy of one component's spec."""
        if name not in self._component_specs:
            raise ValueError(
                f"get_component_spec: unknown component {name!r}; "
                f"valid: {list(self._component_specs)}"
            )
        return copy.deepcopy(self._component_specs[name])

    @property
    def config(self) -> dict[str, Any]:
        return dict(self._configs)

    @property
    def default_call_parameters(self) -> dict[str, Any]:
        """Every named input of the blocks with its default."""
        return {p.name: p.default for p in self._blocks.inputs if p.name is not None}

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

    def _set_component(self, name: str, value: Any, load_id: str | None = None,
                       dtype: torch.dtype | None = None) -> Any:
        """Store a component, going through the manager so shared weights are one object."""
        if value is not None and self._manager is not None:
            component_id = self._manager.add(
                name, value, collection=self._collection, load_id=load_id,
                requested_dtype=dtype,
            )
            value = self._manager.get(component_id)
            self._component_ids[name] = component_id
        self._components[name] = value
        return value

    def update_components(self, **components_or_configs: Any) -> None:
        """Replace components (e.g. `scheduler=EulerDiscreteScheduler(...)`) or configs.

        A component that was loaded from a source (by a pipeline or `ComponentSpec.load`)
        keeps that source in its spec; a model without one is saved into the pipeline's
        folder by `save_pretrained`; a weight-free object is recreated from its config."""
        for name, value in components_or_configs.items():
            if name in self._component_specs:
                self._component_specs[name] = self._spec_for(name, value)
                # The object given is the one to use: no load id, so the manager shares it
                # only when it is the very object (or the same weights) it already holds.
                self._set_component(name, value)
            elif name in self._configs:
                self._configs[name] = value
            else:
                valid = ", ".join([*self._component_specs, *self._configs])
                raise ValueError(
                    f"update_components: {name!r} is neither a component nor a config of "
                    f"{type(self._blocks).__name__}; valid: {valid}"
                )

    def _spec_for(self, name: str, component: Any) -> ComponentSpec:
        current = self._component_specs[name]
        if component is None:
            return current
        load_id = getattr(component, LOAD_ID_ATTRIBUTE, None)
        if current.default_creation_method == "from_pretrained" and load_id in (None, NO_LOAD_ID):
            return ComponentSpec(name, type(component), current.description)
        spec = ComponentSpec.from_component(name, component)
        spec.description = current.description
        return spec

    def load_components(
        self,
        names: str | Iterable[str] | None = None,
        workflow: str | None = None,
        *,
        strict: bool = False,
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> ModularPipeline:
        """Load the named components, those `workflow` needs, or every one with a source that
        is not loaded yet.

        `dtype` (or `torch_dtype`) is one dtype or a dict by component name with a `"default"`
        entry; so is any other keyword, which goes to the component's `from_pretrained` (a
        loading field such as `variant` or `pretrained_model_name_or_path` changes the spec).
        `trust_remote_code` goes only to components from this pipeline's own repo (when it
        has one). As in
        diffusers, an unknown name or a component that fails to load is reported as a warning
        and left None; `strict=True` raises `ValueError` / `ComponentLoadError` instead.
        """
        if "torch_dtype" in kwargs:
            kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
        self._default_dtype = kwargs.get("dtype")
        for name in self._names_to_load(names, workflow, strict):
            spec = self._component_specs[name]
            if spec.pretrained_model_name_or_path is None:
                if strict:
                    raise ComponentLoadError(
                        f"component {name!r} has no source: give the pipeline a checkpoint or "
                        "set it with update_components"
                    )
                logger.info("load_components: skipping %r, it has no source", name)
                continue
            try:
                self._load_one(name, self._kwargs_for(name, kwargs))
            except Exception as error:
                if strict:
                    raise
                warnings.warn(
                    f"load_components: {name!r} was not loaded and stays None: {error}",
                    UserWarning, stacklevel=2,
                )
        if device is not None:
            self.to(device)
        return self

    def _names_to_load(
        self, names: str | Iterable[str] | None, workflow: str | None, strict: bool
    ) -> list[str]:
        if names is not None and workflow is not None:
            raise ValueError("load_components: pass names or workflow, not both")
        specs = self._component_specs
        if names is None:
            wanted = [
                name for name, spec in specs.items()
                if spec.default_creation_method == "from_pretrained"
                and spec.pretrained_model_name_or_path is not None
                and self._components.get(name) is None
            ]
        else:
            wanted = [names] if isinstance(names, str) else list(names)
        if workflow is not None:
            needed = set(self._blocks.get_workflow(workflow).component_names)
            wanted = [name for name in wanted if name in needed]
        unknown = [name for name in wanted if name not in specs]
        if unknown:
            message = f"load_components: unknown component(s) {unknown}; valid: {list(specs)}"
            if strict:
                raise ValueError(message)
            warnings.warn(message + "; ignored", UserWarning, stacklevel=3)
        return [name for name in wanted if name in specs]

    def _kwargs_for(self, name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        """This component's share of `load_components`' keywords."""
        chosen: dict[str, Any] = {}
        for key, value in kwargs.items():
            if not isinstance(value, dict):
                chosen[key] = value
            elif name in value:
                chosen[key] = value[name]
            elif "default" in value:
                chosen[key] = value["default"]
        spec = self._component_specs[name]
        own = self._pretrained_model_name_or_path
        foreign = own is not None and spec.pretrained_model_name_or_path != own
        if "trust_remote_code" in chosen and foreign:
            # Trusting this pipeline's repo is not trusting every repo its index points at.
            del chosen["trust_remote_code"]
        return chosen

    def _load_one(self, name: str, load_kwargs: dict[str, Any]) -> Any:
        dtype = load_kwargs.pop("dtype", None)
        overrides = {key: load_kwargs.pop(key) for key in LOADING_FIELDS if key in load_kwargs}
        if overrides:
            self._component_specs[name] = replace(self._component_specs[name], **overrides)
        spec = self._component_specs[name]
        if self._manager is not None:
            # Another pipeline on this manager may have loaded it: take that object, read
            # nothing.
            shared = self._manager.find_loaded(spec.load_id, dtype)
            if shared is not None:
                return self._set_component(name, shared, load_id=spec.load_id, dtype=dtype)
        index_class = self._index.component_classes.get(name) if self._index else None
        component = load_component(spec, index_class, dtype, load_kwargs=load_kwargs,
                                   **self._hub_kwargs)
        tag_load_id(component, spec.load_id)
        return self._set_component(name, component, load_id=spec.load_id, dtype=dtype)

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
        spec = self._component_specs.get(name)
        if spec is None or spec.pretrained_model_name_or_path is None:
            raise ValueError(
                f"component {name!r} is not loaded and has no source; set it with "
                f"pipe.update_components({name}=...) or load a checkpoint"
            )
        logger.info("loading component %r on first use", name)
        return self._load_one(name, self._kwargs_for(name, {"dtype": self._default_dtype}))

    # -- saving ------------------------------------------------------------------------------

    def save_pretrained(
        self,
        save_directory: str | Path,
        overwrite_modular_index: bool = True,
        variant: str | None = None,
        safe_serialization: bool = True,
        max_shard_size: int | str | None = None,
    ) -> None:
        """Write the loaded components (one subfolder each), a `modular_model_index.json` that
        blockserve and diffusers both read, and a model card (`README.md`, unless one is there).

        Each saved component's index entry points at `save_directory`; with
        `overwrite_modular_index=False` a component loaded from a source keeps pointing there
        (one set by hand has no source, so it points here anyway). Components not loaded keep
        their recorded source."""
        import diffusers

        from blocks.model_card import write_model_card

        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        index: dict[str, Any] = {
            "_class_name": type(self).__name__,
            "_blocks_class_name": type(self._blocks).__name__,
            "_diffusers_version": diffusers.__version__,
            **self._configs,
        }
        options = {"safe_serialization": safe_serialization, "variant": variant,
                   "max_shard_size": max_shard_size}
        for name, spec in self._component_specs.items():
            component = self._components.get(name)
            saveable = component is not None and hasattr(component, "save_pretrained")
            if spec.default_creation_method != "from_pretrained" and not saveable:
                continue  # recreated from the blocks' config on load
            record = {
                "type_hint": list(_class_entry(spec.type_hint)) if component is None
                else list(component_class_entry(component)),
                **{field: getattr(spec, field) for field in LOADING_FIELDS},
            }
            if saveable:
                accepted = _save(component, folder / name, options)
                has_source = getattr(component, LOAD_ID_ATTRIBUTE, None) not in (None, NO_LOAD_ID)
                if overwrite_modular_index or not has_source:
                    record.update(pretrained_model_name_or_path=str(save_directory),
                                  subfolder=name, revision=None,
                                  variant=variant if "variant" in accepted else None)
            library, class_name = component_class_entry(component) if component is not None \
                else (None, None)
            index[name] = [library, class_name, record]
        (folder / MODULAR_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        write_model_card(self._blocks, folder)

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

        Every input the blocks declare goes into the state first: the value passed, else the
        one already in a passed state, else its declared default. A kwargs-type group can be
        passed as a dict (`denoiser_input_fields={...}`): each entry is tagged. Other keywords
        are warned about once and ignored.

        `callback_on_step_end(step, timestep, block_state)` runs after every denoising step;
        returning True stops the call with `GenerationCancelled`.
        """
        state = self.input_state(state, **kwargs)
        if callback_on_step_end is not None:
            state.step_callback = callback_on_step_end
        with torch.inference_mode():
            _, state = run_block(self._blocks, None, self, state)
        if output is None:
            return state
        if isinstance(output, str):
            return state.get(output)
        return {name: state.get(name) for name in output}

    def input_state(self, state: PipelineState | None = None, **kwargs: Any) -> PipelineState:
        """A new state holding `kwargs` as this pipeline's inputs (tagged with their kwargs
        types; a kwargs-type group passed as a dict is tagged entry by entry), on a copy of
        `state` if given; every other declared input gets its default unless the state holds
        it (a required one stays missing); keywords the blocks don't use warn once."""
        state = PipelineState() if state is None else state.copy()
        passed = dict(kwargs)
        inputs = self._blocks.inputs
        for param in inputs:
            if param.name is not None and param.name in passed:
                state.set(param.name, passed.pop(param.name), param.kwargs_type)
            elif param.kwargs_type is not None and param.kwargs_type in passed:
                for key, value in dict(passed.pop(param.kwargs_type)).items():
                    state.set(key, value, param.kwargs_type)
            elif param.name is not None and param.name not in state:
                # A required input is required even with a default: leave it missing.
                default = None if param.required else copy.copy(param.default)
                state.set(param.name, default, param.kwargs_type)
        for key in passed:
            self._warn_unknown(key, {p.key for p in inputs})
        return state

    def _warn_unknown(self, key: str, known: set[str]) -> None:
        if key in self._warned_kwargs:
            return
        self._warned_kwargs.add(key)
        warnings.warn(
            f"{type(self._blocks).__name__} does not use input {key!r}; it is ignored. "
            f"Inputs: {', '.join(sorted(known))}",
            UserWarning,
            stacklevel=4,
        )

    def __repr__(self) -> str:
        loaded = {n: type(c).__name__ for n, c in self._components.items() if c is not None}
        return (
            f"{type(self).__name__}(blocks={type(self._blocks).__name__}, components={loaded}, "
            f"missing={self.null_component_names}, configs={self._configs})"
        )


def pipeline_class_for_blocks(blocks: ModularPipelineBlocks) -> type[ModularPipeline]:
    """The pipeline class `blocks.init_pipeline()` makes: its family's, else the generic one."""
    return _pipeline_class(blocks, None)


def _pipeline_class(
    blocks: ModularPipelineBlocks | None, index: CheckpointIndex | None
) -> type[ModularPipeline]:
    """The index's pipeline class if a family registered it; else the family's pipeline class
    for the blocks (or, for an index without blocks named, its checkpoint's family)."""
    from blocks.families import blocks_for_index, pipeline_class_for_model, pipeline_class_named

    if index is not None:
        named = pipeline_class_named(index.class_name)
        if named is not None:
            return named
        if blocks is None:
            blocks = blocks_for_index(index)
    model_name = getattr(blocks, "model_name", None)
    configs = index.configs if index is not None else None
    return pipeline_class_for_model(model_name, configs) or ModularPipeline


def _class_entry(cls: type | None) -> tuple[str | None, str | None]:
    if cls is None:
        return None, None
    return cls.__module__.split(".")[0], cls.__name__


def _save(component: Any, path: Path, options: dict[str, Any]) -> set[str]:
    """`component.save_pretrained(path)` with the options its signature takes; returns them."""
    parameters = inspect.signature(component.save_pretrained).parameters
    accepted = {k: v for k, v in options.items() if v is not None and k in parameters}
    component.save_pretrained(str(path), **accepted)
    return set(accepted)
