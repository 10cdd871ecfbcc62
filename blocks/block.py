"""`ModularPipelineBlocks`: the base of every block, and the leaf-block contract.

A block is a pure definition: it declares what it needs and produces as data at the top of its
class (`expected_components`, `expected_configs`, `inputs`, `intermediate_outputs`,
`description`) and computes in `__call__(components, state) -> (components, state)`. It holds
no weights; `components` is the pipeline (or anything with the components as attributes).

Composites live in `blocks.composites`; sharing blocks as folders lives in `blocks.hub_blocks`.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

from blocks.specs import ComponentSpec, ConfigSpec, InputParam, OutputParam
from blocks.state import BlockState, PipelineState

# The dotted path of the block that is running (`denoise.prepare_latents`), so error messages
# can name it. A context variable, because the same block instance may sit in several trees.
_BLOCK_PATH: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "blockserve_block_path", default=()
)


@contextlib.contextmanager
def block_path(name: str | None) -> Iterator[None]:
    """Extend the running block path by `name` (None keeps it, e.g. for a chosen branch)."""
    if name is None:
        yield
        return
    token = _BLOCK_PATH.set((*_BLOCK_PATH.get(), name))
    try:
        yield
    finally:
        _BLOCK_PATH.reset(token)


class ModularPipelineBlocks:
    """Base class of all blocks. Subclass it and declare the contract as class attributes (or
    properties), then implement `__call__` with `get_block_state` / `set_block_state`."""

    # The family this block belongs to (e.g. "flux2-klein"): picks the pipeline class
    # `init_pipeline` makes. Packages a block needs, `{"package": ">=1.0"}`: written to and
    # checked when loading `modular_config.json` (composites collect their children's).
    model_name: str | None = None
    _requirements: dict[str, Any] | None = None

    @property
    def description(self) -> str:
        return ""

    @property
    def expected_components(self) -> list[ComponentSpec]:
        return []

    @property
    def expected_configs(self) -> list[ConfigSpec]:
        return []

    @property
    def inputs(self) -> list[InputParam]:
        return []

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        return []

    # -- derived views ----------------------------------------------------------------------

    @property
    def sub_blocks(self) -> Mapping[str, ModularPipelineBlocks]:
        """A leaf has no children: an empty, read-only mapping (composites hold theirs)."""
        return MappingProxyType({})

    @property
    def is_leaf(self) -> bool:
        return True

    @property
    def is_loop(self) -> bool:
        return False

    @property
    def skippable(self) -> bool:
        """Whether this block may not run at all (a conditional with no default branch)."""
        return False

    @property
    def required_inputs(self) -> list[str]:
        return [p.name for p in self.inputs if p.required and p.name is not None]

    @property
    def input_names(self) -> list[str]:
        return [p.name for p in self.inputs if p.name is not None]

    @property
    def outputs(self) -> list[OutputParam]:
        """What a caller gets from this block; its intermediate outputs unless it narrows them
        (a family's top-level blocks may list just `images`)."""
        return self.intermediate_outputs

    @property
    def output_names(self) -> list[str]:
        return [p.name for p in self.intermediate_outputs]

    @property
    def intermediate_output_names(self) -> list[str]:
        return self.output_names

    @property
    def component_names(self) -> list[str]:
        return [spec.name for spec in self.expected_components]

    @property
    def path(self) -> str:
        """The running block's dotted path, or this class's name outside a pipeline run."""
        return ".".join(_BLOCK_PATH.get()) or type(self).__name__

    # -- the leaf contract ------------------------------------------------------------------

    def __call__(self, components: Any, state: PipelineState) -> tuple[Any, PipelineState]:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__")

    def get_block_state(self, state: PipelineState) -> BlockState:
        """This block's declared inputs, read from `state`; the block's own defaults fill
        optional ones the state has no value for (as in diffusers, a branch of a conditional
        block applies its own default here). Tagged values that are None are left out."""
        values: dict[str, Any] = {}
        for param in self.inputs:
            if param.name is None:
                group = state.get_by_kwargs(param.kwargs_type)
                present = {key: value for key, value in group.items() if value is not None}
                values.setdefault(param.kwargs_type, {}).update(present)
                values.update(present)
                continue
            value = state.get(param.name)
            if value is None:
                if param.required:
                    raise ValueError(f"{self.path}: required input '{param.name}' is missing")
                value = copy.copy(param.default)
            if value is not None or param.name not in values:
                values[param.name] = value
        return BlockState(**values)

    def set_block_state(self, state: PipelineState, block_state: BlockState) -> None:
        """Write this block's declared outputs (all of them must be set) to `state`, and every
        input whose value is not the object the state holds: one the block replaced, or a
        default it applied, which then stays in the state for later blocks and the caller."""
        for param in self.intermediate_outputs:
            if param.name not in block_state:
                raise ValueError(f"{self.path}: declared output '{param.name}' was not set")
            state.set(param.name, block_state[param.name], param.kwargs_type)
        for param in self.inputs:
            if param.name is not None:
                if param.name in block_state and block_state[param.name] is not state.get(
                    param.name
                ):
                    state.set(param.name, block_state[param.name], param.kwargs_type)
                continue
            for key, current in state.get_by_kwargs(param.kwargs_type).items():
                if key in block_state and block_state[key] is not current:
                    state.set(key, block_state[key], param.kwargs_type)

    # -- composition helpers shared by all blocks ------------------------------------------

    def init_pipeline(
        self,
        pretrained_model_name_or_path: str | None = None,
        components_manager: Any = None,
        collection: str | None = None,
        **hub_kwargs: Any,
    ) -> Any:
        """A pipeline running a copy of these blocks: the family's pipeline class where
        `model_name` names a family (e.g. `Flux2KleinModularPipeline`), else `ModularPipeline`."""
        from blocks.pipeline import pipeline_class_for_blocks

        return pipeline_class_for_blocks(self)(
            self,
            pretrained_model_name_or_path,
            components_manager=components_manager,
            collection=collection,
            **hub_kwargs,
        )

    def collect_execution(
        self, prefix: str, active: dict[str, Any]
    ) -> list[tuple[str, ModularPipelineBlocks]]:
        """The (dotted name, block) pairs that would run given `active` inputs; the outputs
        of blocks that would run are added to `active`. Composites override this."""
        for name in self.output_names:
            active[name] = True
        return [(prefix or type(self).__name__, self)]

    def save_pretrained(self, save_directory: str) -> None:
        """Share these blocks as a folder: `modular_config.json` plus the defining source."""
        from blocks.hub_blocks import save_custom_blocks

        save_custom_blocks(self, save_directory)

    @classmethod
    def from_pretrained(
        cls, path_or_repo_id: str, trust_remote_code: bool = False, **hub_kwargs: Any
    ) -> ModularPipelineBlocks:
        """Blocks shared with `save_pretrained`; runs their code only if you trust it."""
        from blocks.hub_blocks import load_custom_blocks

        return load_custom_blocks(
            path_or_repo_id, trust_remote_code=trust_remote_code, **hub_kwargs
        )

    @property
    def doc(self) -> str:
        """Inputs and outputs with types, defaults and descriptions."""
        from blocks.rendering import render_doc

        return render_doc(self)

    def __repr__(self) -> str:
        from blocks.rendering import render_block

        return render_block(self)


def run_block(
    block: ModularPipelineBlocks, name: str | None, components: Any, state: PipelineState
) -> tuple[Any, PipelineState]:
    """Run one child block under its path, with its components marked in use.

    The pipeline (`components`) may move models to the execution device and keep them from
    being offloaded while the block runs (`use_components`); plain objects skip that.
    """
    with block_path(name):
        use = getattr(components, "use_components", None)
        # Composites don't hold models themselves: only a leaf or a whole loop does.
        holds_models = use is not None and (block.is_leaf or block.is_loop)
        with use(block.component_names) if holds_models else contextlib.nullcontext():
            result = block(components, state)
        if not isinstance(result, tuple) or len(result) != 2:
            raise TypeError(
                f"{block.path}: __call__ must return (components, state), "
                f"got {type(result).__name__}"
            )
    return result
