"""Stepping denoise loops from outside: one request at a time, or several sharing each step's
model forward (continuous batching at step granularity).

A plain pipeline call runs a loop to its end (`LoopSequentialPipelineBlocks.__call__`). A server
instead *starts* the loop of each request and advances it one step at a time, so requests can
join and leave between steps:

    run = loop.start(components, state)      # a `LoopRun`: this request's loop, step 0
    while not run.done:
        run.step()                            # one step, alone
    state = run.finish()                      # the loop's outputs written to `state`

    errors = step_together([run_a, run_b], same_layout=True)   # one step of each, one
                                              # shared model forward

Each run keeps everything of its own: its `BlockState` (latents, timesteps, guidance scale,
generators...) and its `components` — typically a `ComponentsView` of the pipeline with the
request's own scheduler in front, since schedulers carry per-request state (step index,
multistep history). Only the model forward is shared.

**The forward seam.** A loop child that makes the model call declares itself a `StepForward`
and splits its work into three parts: `forward_rows` (per request: the rows this request adds
to the model's batch — latents, embeddings, one timestep per row — as `ForwardRows`, one per
pass, e.g. conditional and unconditional), `forward` (one model call on the rows of several
requests, concatenated) and `take_outputs` (per request: its slice of the output, then its own
guidance). Its `__call__`, which a plain pipeline call runs, is those three for one request, so
the library computes exactly what it computed before; `step_together` runs them for many.
`run_forwards` is the one place where rows become model calls: rows with equal `key`s share a
call, and a `ForwardPlan` may split a group into several sub-forwards.

**Per-request features.** A run's `extras` (`LoopRun.extras`) go with each of its rows
(`ForwardRows.extras`, then `ForwardBatch.extras`), and `run_forwards` applies them per sample
inside the shared forwards:

- `extras[ADAPTERS]` (adapter name -> scale): the request's LoRA adapters, applied to its rows
  only (`blocks.lora.adapters_per_sample`, rows expanded per request); in such a forward the
  rows of requests without adapters get none. A forward where no request names any leaves the
  choice to the thread's `adapters_for_call` or the model's active set, as a plain call does,
  so a server runs under `adapters_for_call({})`: then a request gets the same adapters alone
  or batched;
- `extras[STEP_CACHE]` (a `blocks.step_cache.StepCache`): the request's step-cache memory and
  decisions; a group holding any goes through `blocks.step_cache.run_cached`, which splits it
  into full and cached sub-forwards (one slot per pass index).

Bit for bit: under `blocks.batch_invariance.batch_invariant()` every sample of a forward is
computed independently of the others, and with `same_layout=True` its rows reach the model in
the same memory layout alone or batched, so a request's image is the same whether its steps
were shared or not; the per-request parts run on the request's own tensors.

Failures stay with their request: `step_together` returns one error (or None) per run. A
forward that fails for a group is retried for each of its requests alone.

Not handled here: choosing which runs step together and when (a scheduler's job:
`deployments.step_scheduler`), loops that override `__call__` (they cannot be stepped:
`steppable` says so and they run whole), and sharing a forward between different models.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from blocks.block import ModularPipelineBlocks, block_path, run_block
from blocks.lora import adapters_per_sample
from blocks.state import BlockState, PipelineState
from blocks.step_cache import CachedMember, cacheable_component, run_cached
from blocks.step_cache.hooks import ProbeDone, cache_call, current_call

if TYPE_CHECKING:
    from blocks.composites import LoopSequentialPipelineBlocks


# -- the forward seam ------------------------------------------------------------------------

# Keys of the per-request values `run_forwards` applies per sample (module docstring).
ADAPTERS = "loras"  # {adapter name: scale}
STEP_CACHE = "step_cache"  # a blocks.step_cache.StepCache


@dataclass
class ForwardRows:
    """One request's rows of one model forward (one pass of one denoising step).

    `inputs` are tensors of `rows` rows each (`(R, ...)`), concatenated with other requests'
    along dim 0; a timestep is one of them, one per row. `options` are passed to the model as
    they are: every request sharing the forward must have equal ones, which `key` guarantees
    (rows with equal keys may share a forward). `extras`: per-request values applied per
    sample (`ADAPTERS`, `STEP_CACHE`; the module docstring)."""

    key: Hashable
    inputs: dict[str, torch.Tensor]
    options: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return next(iter(self.inputs.values())).shape[0]


@dataclass
class ForwardBatch:
    """The rows of several requests as one model call: `inputs` concatenated, the first
    request's `options`, and per request its row count and extras (in order)."""

    inputs: dict[str, torch.Tensor]
    options: dict[str, Any]
    rows: list[int]
    extras: list[dict[str, Any]]

    @classmethod
    def of(cls, members: Sequence[ForwardRows], same_layout: bool = False) -> ForwardBatch:
        """`same_layout`: copy the inputs into new contiguous tensors even for one request, so
        that a request's rows reach the model in the same memory layout alone or batched
        (kernels may round differently for a transposed view). Otherwise a lone request's
        tensors are passed as they are, as diffusers passes them."""
        if len(members) == 1 and not same_layout:
            inputs = dict(members[0].inputs)
        else:
            inputs = {name: torch.cat([m.inputs[name] for m in members])
                      for name in members[0].inputs}
        return cls(inputs, dict(members[0].options), [m.rows for m in members],
                   [m.extras for m in members])

    def split(self, output: torch.Tensor) -> list[torch.Tensor]:
        """The model's (sum of rows, ...) output, one (R, ...) tensor per request."""
        if len(self.rows) == 1:
            return [output]
        # Copies, not views: a request's later ops then see the same memory layout whether it
        # shared the forward or not.
        return [part.clone() for part in output.split(self.rows)]


class StepForward(ModularPipelineBlocks):
    """A loop child whose model forward several requests' steps can share (module docstring).

    Subclasses implement `forward_rows`, `forward` and `take_outputs`; `__call__` (one
    request) is the three in order."""

    def forward_rows(self, components: Any, block_state: BlockState, i: int,
                     t: torch.Tensor) -> list[ForwardRows]:
        """This request's rows of step `i`, one `ForwardRows` per model pass."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward_rows")

    def forward(self, components: Any, batch: ForwardBatch) -> torch.Tensor:
        """One model call on `batch`; returns the (sum of rows, ...) output."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward")

    def take_outputs(self, components: Any, block_state: BlockState,
                     outputs: list[torch.Tensor], i: int, t: torch.Tensor) -> None:
        """This request's outputs (one per pass, its own rows) into its `block_state`."""
        raise NotImplementedError(f"{type(self).__name__} must implement take_outputs")

    def __call__(self, components: Any, block_state: BlockState, i: int, t: torch.Tensor):
        passes = self.forward_rows(components, block_state, i, t)
        outputs = [self.forward(components, ForwardBatch.of([rows])) for rows in passes]
        self.take_outputs(components, block_state, outputs, i, t)
        return components, block_state


# Splits the members of one forward group (rows with equal keys, in order) into the index
# lists of the sub-forwards to run. The default runs them all as one forward.
ForwardPlan = Callable[[Sequence[ForwardRows]], list[list[int]]]


def one_forward(members: Sequence[ForwardRows]) -> list[list[int]]:
    return [list(range(len(members)))]


def run_forwards(
    forwarder: StepForward,
    components: Sequence[Any],
    requests: Sequence[Sequence[ForwardRows]],
    plan: ForwardPlan = one_forward,
    on_forward: Callable[[int, int, float], None] | None = None,
    same_layout: bool = False,
) -> list[list[torch.Tensor] | BaseException]:
    """Run the passes of several requests (`requests[r]`: request r's rows per pass, with
    `components[r]`) as few model calls as their keys allow; returns each request's outputs
    per pass, or the error its forward failed with. A group whose call fails is retried one
    request at a time, so only a request whose own forward fails gets an error. Rows' extras
    apply per sample (module docstring).

    `on_forward(requests, rows, seconds)` is told about each model call made (a step cache's
    probe forwards, which stop early, are not calls);
    `same_layout` is `ForwardBatch.of`'s."""
    outputs: list[list[Any] | BaseException] = [[None] * len(passes) for passes in requests]
    groups: dict[Hashable, list[tuple[int, int]]] = {}
    for r, passes in enumerate(requests):
        for p, rows in enumerate(passes):
            groups.setdefault(rows.key, []).append((r, p))

    def alive(members: list[tuple[int, int]]) -> list[tuple[int, int]]:
        return [(r, p) for r, p in members if not isinstance(outputs[r], BaseException)]

    def call(members: list[tuple[int, int]]) -> bool:
        """One forward for `members` (request, pass); False if the model call failed."""
        live = alive(members)
        if not live:
            return True
        batch = ForwardBatch.of([requests[r][p] for r, p in live], same_layout)
        start = time.perf_counter()
        try:
            with _adapters(batch):
                result = forwarder.forward(components[live[0][0]], batch)
        except Exception as error:  # isolated per request by the caller
            if len(live) == 1:
                outputs[live[0][0]] = error
            return False
        if on_forward is not None:
            on_forward(len(live), sum(batch.rows), time.perf_counter() - start)
        for (r, p), part in zip(live, batch.split(result), strict=True):
            outputs[r][p] = part  # type: ignore[index]
        return True

    def shared(members: list[tuple[int, int]]) -> None:
        """One forward for `members`; if it fails, one per member (under the step cache's
        call narrowed to that member, when one is active)."""
        caching = current_call()
        if not call(members) and len(members) > 1:
            for position, member in enumerate(members):
                # A probe stops with ProbeDone once it measured what it needed.
                with cache_call(None if caching is None else caching.member(position)), \
                        contextlib.suppress(ProbeDone):
                    call([member])
        if caching is not None and caching.mode == "probe":
            # The probe is over, whoever's forward failed (`run_cached` expects it to stop).
            raise ProbeDone

    def cached(members: list[tuple[int, int]], caches: list[Any]) -> None:
        """`members`' forward through their step caches: full and cached sub-forwards."""
        try:
            model = _cache_model(forwarder, components[members[0][0]])
            run_cached(model, [CachedMember(cache, p, requests[r][p].rows)
                               for (r, p), cache in zip(members, caches, strict=True)],
                       lambda indices: shared([members[k] for k in indices]))
        except Exception as error:  # not a model call's failure: every member fails
            for r, _ in alive(members):
                outputs[r] = error

    for members in groups.values():
        for indices in plan([requests[r][p] for r, p in members]):
            # A request whose earlier pass failed is out (its cache slots would not match).
            chosen = alive([members[k] for k in indices])
            caches = [requests[r][p].extras.get(STEP_CACHE) for r, p in chosen]
            if any(cache is not None for cache in caches):
                cached(chosen, caches)
            elif chosen:
                shared(chosen)
    return outputs  # type: ignore[return-value]


def _adapters(batch: ForwardBatch) -> contextlib.AbstractContextManager[None]:
    """The batch's LoRA adapters per row, when any request has some (module docstring)."""
    sets = [extras.get(ADAPTERS) or {} for extras in batch.extras]
    if not any(sets):
        return contextlib.nullcontext()
    return adapters_per_sample([adapters for adapters, rows in zip(sets, batch.rows, strict=True)
                                for _ in range(rows)])


def _cache_model(forwarder: StepForward, components: Any) -> torch.nn.Module:
    """The model whose forwards `forwarder` makes, which a step cache's hooks act on."""
    named = {spec.name: getattr(components, spec.name, None)
             for spec in forwarder.expected_components}
    model = cacheable_component(named)
    if model is None:
        raise ValueError(f"step cache: {type(forwarder).__name__} calls none of the cacheable "
                         f"models (its components: {', '.join(named) or 'none'})")
    return model


# -- runs ------------------------------------------------------------------------------------


def steppable(loop: Any) -> bool:
    """Whether `loop` can be started and stepped from outside: a framework loop that keeps
    the framework's `__call__` (a loop that overrides it runs whole)."""
    from blocks.composites import LoopSequentialPipelineBlocks

    return (isinstance(loop, LoopSequentialPipelineBlocks)
            and type(loop).__call__ is LoopSequentialPipelineBlocks.__call__)


class LoopRun:
    """One request's denoise loop in progress: its loop, components, state and step index, and
    the `extras` its model forwards apply to its rows (adapters, a step cache)."""

    def __init__(self, loop: LoopSequentialPipelineBlocks, components: Any,
                 state: PipelineState, path: str | None = None) -> None:
        self.loop = loop
        self.components = components
        self.state = state
        self.path = path
        with block_path(path):
            loop._check_leaf_children()
            self.block_state = loop.get_block_state(state)
        self.timesteps = self.block_state.timesteps
        self.total = len(self.timesteps)
        self.i = 0
        # Read once: a loop's component list is derived from its children on every access,
        # and every step marks those components in use (`_using`).
        self.component_names = loop.component_names
        # Per-request values its forwards apply per sample (`ADAPTERS`, `STEP_CACHE`).
        self.extras: dict[str, Any] = {}

    @property
    def done(self) -> bool:
        return self.i >= self.total

    @property
    def t(self) -> Any:
        return self.timesteps[self.i]

    def step(self) -> None:
        """One step of this run alone; then the pipeline's step callback (which may stop the
        call with `GenerationCancelled`)."""
        i, t = self.i, self.t
        error = step_together([self])[0]
        if error is not None:
            raise error
        self.loop.step_end(self.state, self.block_state, i, t, self.total)

    def finish(self) -> PipelineState:
        """Write the loop's outputs to the run's state and return it."""
        with block_path(self.path):
            self.loop.set_block_state(self.state, self.block_state)
        return self.state


def _split_children(loop: LoopSequentialPipelineBlocks):
    """(children before the shared forward, the `StepForward` child and its name or None,
    children after it)."""
    items = list(loop.sub_blocks.items())
    for index, (name, child) in enumerate(items):
        if isinstance(child, StepForward):
            return items[:index], (name, child), items[index + 1:]
    return items, None, []


@contextlib.contextmanager
def _using(runs: Sequence[LoopRun]) -> Iterator[None]:
    """Each distinct loop's components marked in use (loaded, on the device) for the step."""
    with contextlib.ExitStack() as stack:
        seen: set[tuple[int, int]] = set()
        for run in runs:
            use = getattr(run.components, "use_components", None)
            marker = (id(run.loop), id(getattr(run.components, "_pipeline", run.components)))
            if use is not None and marker not in seen:
                seen.add(marker)
                stack.enter_context(use(run.component_names))
        yield


def step_together(
    runs: Sequence[LoopRun],
    plan: ForwardPlan = one_forward,
    on_forward: Callable[[int, int, float], None] | None = None,
    same_layout: bool = False,
) -> list[BaseException | None]:
    """One step of every run (none of them done), their model forwards shared where their
    rows' keys allow (module docstring); returns each run's error, or None. A run that failed
    did not advance; the others did. No step callbacks run here (`LoopRun.step` runs them).

    `on_forward(requests, rows, seconds)` is told about each model call (`run_forwards`). A
    server that must give a request the same bits alone or batched passes `same_layout=True`
    (see `ForwardBatch.of`) and computes under `blocks.batch_invariance.batch_invariant()`.
    """
    errors: list[BaseException | None] = [None] * len(runs)
    timesteps = [run.t for run in runs]  # indexing a timestep tensor costs ~20 us a time

    def each(index: int, name: str, child: Any) -> None:
        run = runs[index]
        if errors[index] is not None:
            return
        try:
            with block_path(run.path), block_path(name):
                run.components, run.block_state = child(
                    run.components, run.block_state, i=run.i, t=timesteps[index])
        except Exception as error:  # this run fails, the others go on
            errors[index] = error

    with _using(runs):
        layouts = [_split_children(run.loop) for run in runs]
        for index, (before, _, _) in enumerate(layouts):
            for name, child in before:
                each(index, name, child)
        sharing = [index for index, (_, shared, _) in enumerate(layouts)
                   if shared is not None and errors[index] is None]
        passes: dict[int, list[ForwardRows]] = {}
        for index in sharing:
            run = runs[index]
            name, child = layouts[index][1]  # type: ignore[misc]
            try:
                with block_path(run.path), block_path(name):
                    passes[index] = child.forward_rows(run.components, run.block_state,
                                                       run.i, timesteps[index])
                for rows in passes[index]:
                    rows.extras = {**run.extras, **rows.extras}
            except Exception as error:
                errors[index] = error
        by_class: dict[type, list[int]] = {}
        for index in passes:
            by_class.setdefault(type(layouts[index][1][1]), []).append(index)  # type: ignore[index]
        for members in by_class.values():
            forwarder = layouts[members[0]][1][1]  # type: ignore[index]
            results = run_forwards(forwarder, [runs[i].components for i in members],
                                   [passes[i] for i in members], plan, on_forward, same_layout)
            for index, result in zip(members, results, strict=True):
                run = runs[index]
                name, child = layouts[index][1]  # type: ignore[misc]
                if isinstance(result, BaseException):
                    errors[index] = result
                    continue
                try:
                    with block_path(run.path), block_path(name):
                        child.take_outputs(run.components, run.block_state, result, run.i,
                                           timesteps[index])
                except Exception as error:
                    errors[index] = error
        for index, (_, _, after) in enumerate(layouts):
            for name, child in after:
                each(index, name, child)
    for index, run in enumerate(runs):
        if errors[index] is None:
            run.i += 1
    return errors


# -- a whole block, paused at its loops --------------------------------------------------------


class BlockRun:
    """Runs a block (a tree) for one request, pausing at each steppable loop so a scheduler can
    step it: `advance()` runs blocks up to the next loop and returns it started (a `LoopRun`),
    or runs to the end and returns None. The blocks that run are those
    `block.collect_execution` picks for the state's inputs, as a plain call would."""

    def __init__(self, block: ModularPipelineBlocks, name: str, components: Any,
                 state: PipelineState) -> None:
        active = {key: True for key, value in state.values.items() if value is not None}
        self.plan = block.collect_execution(name, active)
        self.components = components
        self.state = state
        self._next = 0
        self.loop: LoopRun | None = None

    def advance(self) -> LoopRun | None:
        if self.loop is not None:
            self.state = self.loop.finish()
            self.loop = None
        while self._next < len(self.plan):
            path, block = self.plan[self._next]
            self._next += 1
            if block.is_loop and steppable(block):
                self.loop = block.start(self.components, self.state, path)  # type: ignore[attr-defined]
                if not self.loop.done:
                    return self.loop
                self.state = self.loop.finish()
                self.loop = None
                continue
            self.components, self.state = run_block(block, path, self.components, self.state)
        return None


class ComponentsView:
    """A pipeline as one request's blocks see it: the pipeline's components and configs, with
    `overrides` (e.g. the request's own scheduler) in front."""

    def __init__(self, pipeline: Any, overrides: dict[str, Any]) -> None:
        self._pipeline = pipeline
        self._overrides = overrides

    def __getattr__(self, name: str) -> Any:
        overrides = self.__dict__["_overrides"]
        if name in overrides:
            return overrides[name]
        return getattr(self.__dict__["_pipeline"], name)
