"""Composite blocks: sequences, conditional branches, auto branches and denoise loops.

A composite holds its children in `sub_blocks` (an `InsertableDict`); everything it declares
(components, configs, inputs, outputs, requirements) is derived from the children on every
access, so inserting, popping or replacing a child changes execution, inputs, components and
repr alike. Which blocks run for given inputs follows diffusers: `select_block` names a branch
only when its trigger is present (the default applies after it), a conditional's
`get_execution_blocks` returns the chosen block itself (None when it is skipped), a
sequence's returns the flat sequence of leaf blocks that would run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from blocks.block import ModularPipelineBlocks, run_block
from blocks.errors import GenerationCancelled
from blocks.insertable_dict import InsertableDict
from blocks.specs import (
    ComponentSpec,
    ConfigSpec,
    InputParam,
    OutputParam,
    combine_inputs,
    merge_by_name,
    merge_inputs,
)
from blocks.state import BlockState, PipelineState

if TYPE_CHECKING:
    from blocks.stepping import LoopRun

BlockLike = type[ModularPipelineBlocks] | ModularPipelineBlocks


def _instantiate(block: BlockLike) -> ModularPipelineBlocks:
    return block() if isinstance(block, type) else block


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _inputs_after_producers(
    children: Iterable[ModularPipelineBlocks], leading: list[InputParam] | None = None
) -> list[InputParam]:
    """Ordered union of the children's inputs, minus the named values earlier children always
    produce. A kwargs-type group (`**denoiser_input_fields`) stays an input even when an earlier
    child produces tagged values: the caller may add more (`pipe(denoiser_input_fields={...})`)."""
    produced: set[str] = set()
    groups = [leading] if leading else []
    for child in children:
        groups.append([p for p in child.inputs if p.name is None or p.name not in produced])
        if not child.skippable:
            produced.update(output.name for output in child.intermediate_outputs)
    return merge_inputs(groups)


class CompositeBlocks(ModularPipelineBlocks):
    """What every composite shares: children, derived declarations and workflows.

    Subclasses list their children in `block_classes` / `block_names` (classes or instances),
    or are built with `from_blocks_dict`. `_workflow_map` names input patterns:
    `{"image2image": {"prompt": True, "image": True}}`.
    """

    block_classes: list[BlockLike] = []
    block_names: list[str] = []
    _workflow_map: dict[str, dict[str, Any]] = {}

    def __init__(self) -> None:
        if len(self.block_classes) != len(self.block_names):
            raise ValueError(
                f"{type(self).__name__}: block_classes has {len(self.block_classes)} entries "
                f"but block_names has {len(self.block_names)}"
            )
        if len(set(self.block_names)) != len(self.block_names):
            raise ValueError(f"{type(self).__name__}: duplicate block_names {self.block_names}")
        self.sub_blocks = InsertableDict(
            (name, _instantiate(block))
            for name, block in zip(self.block_names, self.block_classes, strict=True)
        )

    @property
    def sub_blocks(self) -> InsertableDict:
        return self._sub_blocks

    @sub_blocks.setter
    def sub_blocks(self, value: InsertableDict) -> None:
        self._sub_blocks = value

    @classmethod
    def from_blocks_dict(
        cls, blocks_dict: dict[str, BlockLike], description: str | None = None
    ) -> CompositeBlocks:
        """A composite of this class whose children are `blocks_dict`, in order."""
        instance = cls.__new__(cls)
        instance.sub_blocks = InsertableDict(
            (name, _instantiate(block)) for name, block in blocks_dict.items()
        )
        if description is not None:
            instance._description = description
        return instance

    @property
    def description(self) -> str:
        return getattr(self, "_description", "")

    @property
    def model_name(self) -> str | None:  # type: ignore[override]
        """The first child's family, unless the class names one."""
        names = (getattr(b, "model_name", None) for b in self.sub_blocks.values())
        return next((name for name in names if name), None)

    @property
    def _requirements(self) -> dict[str, Any]:  # type: ignore[override]
        """Each child's requirements under its name (nested for composite children)."""
        return {
            name: block._requirements
            for name, block in self.sub_blocks.items()
            if getattr(block, "_requirements", None)
        }

    @property
    def is_leaf(self) -> bool:
        return False

    @property
    def expected_components(self) -> list[ComponentSpec]:
        return merge_by_name([b.expected_components for b in self.sub_blocks.values()])

    @property
    def expected_configs(self) -> list[ConfigSpec]:
        return merge_by_name([b.expected_configs for b in self.sub_blocks.values()])

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        return merge_by_name([b.intermediate_outputs for b in self.sub_blocks.values()])

    # -- workflows ---------------------------------------------------------------------------

    @property
    def available_workflows(self) -> list[str]:
        return list(self._workflow_map)

    def get_workflow(self, name: str) -> SequentialPipelineBlocks:
        """The flat sequence of blocks that runs for the named workflow."""
        if name not in self._workflow_map:
            available = ", ".join(self._workflow_map) or "(none declared)"
            raise ValueError(
                f"unknown workflow {name!r} for {type(self).__name__}; available: {available}"
            )
        triggers = self._workflow_map[name]
        if isinstance(triggers, tuple):  # alternative spellings of one workflow select alike
            triggers = triggers[0]
        return self._flat_execution_blocks(**triggers)

    def _flat_execution_blocks(self, **inputs: Any) -> SequentialPipelineBlocks:
        """The flat sequence of leaf blocks (dotted names) that would run for these inputs."""
        active = {key: value for key, value in inputs.items() if value is not None}
        pairs = self.collect_execution("", active)
        return SequentialPipelineBlocks.from_blocks_dict(
            dict(pairs), description=f"execution blocks of {type(self).__name__}"
        )

    def get_execution_blocks(self, **inputs: Any) -> ModularPipelineBlocks | None:
        """The blocks that would run for these inputs (see the subclasses)."""
        return self._flat_execution_blocks(**inputs)


class SequentialPipelineBlocks(CompositeBlocks):
    """Children run in order on one shared `PipelineState`. `get_execution_blocks(**inputs)`
    returns the flat sequence of leaf blocks (dotted names) that would run."""

    @property
    def inputs(self) -> list[InputParam]:
        return _inputs_after_producers(self.sub_blocks.values())

    def __call__(self, components: Any, state: PipelineState) -> tuple[Any, PipelineState]:
        for name, block in self.sub_blocks.items():
            components, state = run_block(block, name, components, state)
        return components, state

    def collect_execution(
        self, prefix: str, active: dict[str, Any]
    ) -> list[tuple[str, ModularPipelineBlocks]]:
        pairs: list[tuple[str, ModularPipelineBlocks]] = []
        for name, block in self.sub_blocks.items():
            pairs.extend(block.collect_execution(_join(prefix, name), active))
        return pairs


class ConditionalPipelineBlocks(CompositeBlocks):
    """Runs the one child `select_block(**trigger values)` names, else `default_block_name`;
    with neither, nothing runs and the children's outputs stay absent.

    `block_trigger_inputs` lists the state values passed to `select_block`. The chosen child
    runs under this block's own path: `denoise.prepare_latents`, not `denoise.t2i.prepare...`.
    """

    block_trigger_inputs: list[str | None] = []
    default_block_name: str | None = None

    def __init__(self) -> None:
        super().__init__()
        default = self.default_block_name
        if default is not None and default not in self.sub_blocks:
            raise ValueError(
                f"{type(self).__name__}: default_block_name {default!r} is not one of "
                f"{list(self.sub_blocks)}"
            )

    def select_block(self, **inputs: Any) -> str | None:
        """Name of the child to run for these trigger values, or None for the default."""
        raise NotImplementedError(f"{type(self).__name__} must implement select_block")

    def get_execution_blocks(self, **inputs: Any) -> ModularPipelineBlocks | None:
        """The chosen branch (resolved down to a leaf or a flat sequence), or None when this
        block would be skipped."""
        active = {key: value for key, value in inputs.items() if value is not None}
        name = self._chosen(active)
        if name is None:
            return None
        block = self.sub_blocks[name]
        if block.is_leaf or block.is_loop:
            return block
        return block.get_execution_blocks(**inputs)

    @property
    def trigger_names(self) -> list[str]:
        return [name for name in self.block_trigger_inputs if name is not None]

    @property
    def skippable(self) -> bool:
        return self.default_block_name is None

    @property
    def inputs(self) -> list[InputParam]:
        branches = list(self.sub_blocks.values())
        merged = combine_inputs(*((name, b.inputs) for name, b in self.sub_blocks.items()))
        required_everywhere = set.intersection(*(set(b.required_inputs) for b in branches))
        result = []
        for param in merged:
            must = param.name in required_everywhere and not self.skippable
            if param.required != must:
                param = replace(param, required=must)
            result.append(param)
        known = {p.name for p in result}
        result += [InputParam(name) for name in self.trigger_names if name not in known]
        return result

    def _chosen(self, values: dict[str, Any]) -> str | None:
        triggers = {name: values.get(name) for name in self.trigger_names}
        name = self.select_block(**triggers) or self.default_block_name
        if name is not None and name not in self.sub_blocks:
            raise ValueError(
                f"{self.path}: select_block chose {name!r}; valid: {list(self.sub_blocks)}"
            )
        return name

    def __call__(self, components: Any, state: PipelineState) -> tuple[Any, PipelineState]:
        name = self._chosen(state.values)
        if name is None:
            return components, state
        return run_block(self.sub_blocks[name], None, components, state)

    def collect_execution(
        self, prefix: str, active: dict[str, Any]
    ) -> list[tuple[str, ModularPipelineBlocks]]:
        name = self._chosen(active)
        if name is None:
            return []
        return self.sub_blocks[name].collect_execution(prefix, active)


class AutoPipelineBlocks(ConditionalPipelineBlocks):
    """The first child (in order) whose trigger input is present runs; a `None` trigger marks
    the default child, which must come last. No default and no trigger present: skipped."""

    def __init__(self) -> None:
        cls = type(self).__name__
        triggers = self.block_trigger_inputs
        if not self.block_classes:
            raise ValueError(f"{cls}: an AutoPipelineBlocks needs at least one branch")
        if len(triggers) != len(self.block_classes):
            raise ValueError(
                f"{cls}: block_trigger_inputs has {len(triggers)} entries but there are "
                f"{len(self.block_classes)} block_classes"
            )
        if None in triggers[:-1]:
            raise ValueError(f"{cls}: only the last branch may be the default (trigger None)")
        self._trigger_by_name = dict(zip(self.block_names, triggers, strict=False))
        super().__init__()  # checks block_names against block_classes

    @property
    def default_block_name(self) -> str | None:  # type: ignore[override]
        defaults = [name for name, trig in self._trigger_by_name.items() if trig is None]
        return defaults[0] if defaults and defaults[0] in self.sub_blocks else None

    def select_block(self, **inputs: Any) -> str | None:
        """The first branch whose trigger is present; None when none is (the default branch,
        if there is one, then runs)."""
        for name in self.sub_blocks:
            if name not in self._trigger_by_name:
                raise ValueError(
                    f"{self.path}: branch {name!r} was added without a trigger input; "
                    f"known branches: {list(self._trigger_by_name)}"
                )
            trigger = self._trigger_by_name[name]
            if trigger is not None and inputs.get(trigger) is not None:
                return name
        return None

    @property
    def description(self) -> str:
        own = getattr(self, "_description", "")
        if own:
            return own
        branches = ", ".join(
            f"{name} when `{trigger}` is given" if trigger else f"{name} otherwise"
            for name, trigger in ((n, self._trigger_by_name.get(n)) for n in self.sub_blocks)
        )
        return f"Runs {branches}."


class LoopSequentialPipelineBlocks(CompositeBlocks):
    """A loop whose leaf children run once per iteration on one shared `BlockState`.

    Loop-level declarations (`loop_expected_components`, `loop_inputs`,
    `loop_intermediate_outputs`) are what the loop itself needs and returns; children are
    called as `child(components, block_state, i=i, t=t)`. The default `__call__` iterates over
    `block_state.timesteps` with a progress bar and the pipeline's step callback (return True
    from it to stop: the call ends with `GenerationCancelled`).

    `start(components, state)` begins the loop without running it: the returned
    `blocks.stepping.LoopRun` is advanced one step at a time from outside, alone or sharing
    its model forward with other requests' runs (`blocks.stepping.step_together`). `__call__`
    is that, run to the end.
    """

    loop_expected_components: list[ComponentSpec] = []
    loop_expected_configs: list[ConfigSpec] = []
    loop_inputs: list[InputParam] = []
    loop_intermediate_outputs: list[OutputParam] = []

    def __init__(self) -> None:
        super().__init__()
        self._check_leaf_children()

    def _check_leaf_children(self) -> None:
        for name, block in self.sub_blocks.items():
            if not block.is_leaf:
                raise ValueError(
                    f"{type(self).__name__}: loop sub-block {name!r} "
                    f"({type(block).__name__}) is not a leaf block; loops run leaf blocks only"
                )

    @property
    def is_loop(self) -> bool:
        return True

    @property
    def expected_components(self) -> list[ComponentSpec]:
        children = [b.expected_components for b in self.sub_blocks.values()]
        return merge_by_name([self.loop_expected_components, *children])

    @property
    def expected_configs(self) -> list[ConfigSpec]:
        children = [b.expected_configs for b in self.sub_blocks.values()]
        return merge_by_name([self.loop_expected_configs, *children])

    @property
    def inputs(self) -> list[InputParam]:
        return _inputs_after_producers(self.sub_blocks.values(), leading=self.loop_inputs)

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        return list(self.loop_intermediate_outputs)

    def collect_execution(
        self, prefix: str, active: dict[str, Any]
    ) -> list[tuple[str, ModularPipelineBlocks]]:
        return ModularPipelineBlocks.collect_execution(self, prefix, active)

    def step_end(
        self, state: PipelineState, block_state: BlockState, i: int, t: Any, total: int
    ) -> None:
        """Report a finished step to the caller's callback; stop if it asks to."""
        if state.step_callback is not None and state.step_callback(i, t, block_state) is True:
            raise GenerationCancelled(i, total)

    def start(self, components: Any, state: PipelineState, path: str | None = None) -> LoopRun:
        """This loop for one request, at step 0, to be stepped from outside (`LoopRun`);
        `path` is its dotted name in the pipeline, for error messages."""
        from blocks.stepping import LoopRun

        return LoopRun(self, components, state, path)

    def __call__(self, components: Any, state: PipelineState) -> tuple[Any, PipelineState]:
        run = self.start(components, state)
        with progress_bar(components, run.total) as bar:
            while not run.done:
                run.step()
                bar.update()
        return run.components, run.finish()


def progress_bar(components: Any, total: int) -> contextlib.AbstractContextManager:
    """The pipeline's progress bar (which callers can silence), or a silent one."""
    make = getattr(components, "progress_bar", None)
    return make(total=total) if make is not None else tqdm(total=total, disable=True)
