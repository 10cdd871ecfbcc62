"""`RemoteBlock`: a block that runs another block in another process, through a handle.

Every block declares what it reads and writes, so a block can run elsewhere: send exactly its
declared inputs, run it there on that process's components, write back its declared outputs.
The router swaps the heavy top-level blocks a family declares (`Family.heavy_blocks`: block
name -> role) for RemoteBlocks on the deployment of that role; nothing else changes, so no
pipeline is defined twice (`remote_pipeline_blocks`).

What crosses the wire (`pack_call` / `BlockCall`): plain values, CPU tensors (Ray puts large
arguments in its object store), weight-free components the block expects (e.g. the request's
scheduler: it is small, and it is the router's choice), and generators as their *states*:
`torch.Generator` can't be pickled, so each is rebuilt remotely from `get_state()` and its
advanced state is sent back and set on the local generator — the next block draws the same
numbers it would have drawn in one process, which keeps images identical. The LoRA adapters
the caller's block runs under (`blocks.lora.adapters_for_call`, how the engine runs a merged
text encoding) travel too (`BlockCall.adapters`): the replica loads and applies them.

Failures: a block call is a pure function of what it sends (generator states included), so a
call whose replica died or became unreachable is sent once more — Serve routes it to a live
replica. If that fails too, or the deployment's queue is full (`max_queued_requests`), the
call raises `ReplicaUnavailable` (a `blocks.errors.Unavailable`), which the service answers
with 503 and `Retry-After`.

The block that holds a denoise loop streams instead (`RemoteBlock.stream`): the replica's step
scheduler runs it with every other router's requests, and each step is reported back as it is
done (progress, previews, metrics); cancelling the stream stops it at its next step.

Not handled here: which process runs the block (the handle decides), and step scheduling (the
Denoiser's `deployments.step_scheduler`).
"""

from __future__ import annotations

import copy
import math
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from blocks.block import ModularPipelineBlocks
from blocks.composites import CompositeBlocks
from blocks.errors import InvalidInput, Unavailable
from blocks.families import DENOISER, TEXT_ENCODER, VAE, HeavyRole
from blocks.lora.selection import current_call_adapters
from blocks.specs import ComponentSpec, ConfigSpec, InputParam, OutputParam
from blocks.state import PipelineState
from deployments.step_scheduler import TaskStopped

# The deployment (`deployments.heavy`) that runs each heavy role's blocks.
ROLE_DEPLOYMENTS: dict[HeavyRole, str] = {
    TEXT_ENCODER: "TextEncoder",
    DENOISER: "Denoiser",
    VAE: "VAE",
}

REPLICA_RETRY_AFTER_S = 5  # about what Serve needs to replace a dead replica


class ReplicaUnavailable(Unavailable):
    """No replica of `deployment` could run the call now; retry in `retry_after` seconds."""

    def __init__(self, deployment: str | None, reason: str,
                 retry_after: int = REPLICA_RETRY_AFTER_S) -> None:
        super().__init__(f"deployment {deployment or 'unknown'} unavailable: {reason}",
                         retry_after)
        self.deployment = deployment


def _replica_failures() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(errors worth one retry: the replica died or is unreachable, errors that mean the
    deployment is overloaded). Imported late: this module is used without Ray in tests."""
    try:
        from ray import exceptions as ray_errors
        from ray.serve import exceptions as serve_errors
    except ImportError:  # no Ray: nothing can fail that way
        return (), ()

    retry = (ray_errors.RayActorError, ray_errors.ActorUnavailableError,
             serve_errors.DeploymentUnavailableError, serve_errors.ReplicaUnavailableError)
    return retry, (serve_errors.BackPressureError,)


@dataclass
class GeneratorState:
    """A `torch.Generator` on the wire: its device and state."""

    device: str
    state: torch.Tensor

    @classmethod
    def of(cls, generator: torch.Generator) -> GeneratorState:
        return cls(str(generator.device), generator.get_state())

    def rebuild(self) -> torch.Generator:
        generator = torch.Generator(self.device)
        generator.set_state(self.state)
        return generator


def _encode(value: Any, generators: list[torch.Generator]) -> Any:
    """`value` with generators replaced by their states (collected in `generators`, in
    traversal order) and tensors moved to the CPU."""
    if isinstance(value, torch.Generator):
        generators.append(value)
        return GeneratorState.of(value)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, list):
        return [_encode(item, generators) for item in value]
    if isinstance(value, tuple):
        return tuple(_encode(item, generators) for item in value)
    if isinstance(value, dict):
        return {key: _encode(item, generators) for key, item in value.items()}
    return value


def _decode(value: Any, generators: list[torch.Generator]) -> Any:
    """The inverse of `_encode`: generators rebuilt (and collected, in the same order)."""
    if isinstance(value, GeneratorState):
        generator = value.rebuild()
        generators.append(generator)
        return generator
    if isinstance(value, list):
        return [_decode(item, generators) for item in value]
    if isinstance(value, tuple):
        return tuple(_decode(item, generators) for item in value)
    if isinstance(value, dict):
        return {key: _decode(item, generators) for key, item in value.items()}
    return value


@dataclass
class BlockCall:
    """One remote block call: which model, the block to run (its name in the pipeline and its
    definition: the router's, a few kB), its inputs and the components it brings."""

    model: str
    block: str
    inputs: list[tuple[str, Any, str | None]]  # (name, encoded value, kwargs type)
    components: dict[str, Any] = field(default_factory=dict)  # weight-free, e.g. scheduler
    block_def: ModularPipelineBlocks | None = None
    # The LoRA adapters (name -> scale) the block runs under; None: the caller chose none
    # (a denoise task's adapters are in its `TaskOptions`).
    adapters: dict[str, float] | None = None

    def input_values(self) -> dict[str, Any]:
        return {name: value for name, value, _ in self.inputs}


@dataclass
class BlockResult:
    """What a remote block call sends back: changed values and the generators' new states."""

    outputs: list[tuple[str, Any, str | None]]
    generator_states: list[torch.Tensor]


def pack_call(
    model: str, name: str, block: ModularPipelineBlocks, state: PipelineState,
    components: dict[str, Any],
) -> tuple[BlockCall, list[torch.Generator]]:
    """The call for `block`'s declared inputs in `state` (None values left out), and the
    local generators it carries, in wire order."""
    generators: list[torch.Generator] = []
    inputs: list[tuple[str, Any, str | None]] = []
    for param in block.inputs:
        if param.name is None:  # a kwargs-type group: every value tagged with it
            for key, value in state.get_by_kwargs(param.kwargs_type).items():
                inputs.append((key, _encode(value, generators), param.kwargs_type))
            continue
        value = state.get(param.name)
        if value is not None:
            inputs.append((param.name, _encode(value, generators), param.kwargs_type))
    return BlockCall(model, name, inputs, components, block, current_call_adapters()), generators


@dataclass
class ReceivedCall:
    """A `BlockCall` on the remote side: its inputs as a state, with generators rebuilt."""

    state: PipelineState
    sent: dict[str, Any]  # the decoded inputs, to tell what the block changed
    generators: list[torch.Generator]

    @classmethod
    def of(cls, call: BlockCall) -> ReceivedCall:
        generators: list[torch.Generator] = []
        state = PipelineState()
        sent: dict[str, Any] = {}
        for key, value, kind in call.inputs:
            decoded = _decode(value, generators)
            sent[key] = decoded
            state.set(key, decoded, kind)
        return cls(state, sent, generators)

    def result(self, state: PipelineState) -> BlockResult:
        """What goes back: the values the block set or changed, and the generators' states."""
        outputs = []
        for key, value in state.values.items():
            if key in self.sent and value is self.sent[key]:
                continue  # unchanged input: the caller has it
            kind = next((k for k, names in state.kwargs_mapping.items() if key in names), None)
            outputs.append((key, _encode(value, []), kind))
        return BlockResult(outputs, [g.get_state() for g in self.generators])


def run_call(
    block: ModularPipelineBlocks, name: str, components: Any, call: BlockCall
) -> BlockResult:
    """Run `call` on `block` in this process (the remote side of a RemoteBlock)."""
    from blocks.block import run_block

    received = ReceivedCall.of(call)
    with torch.inference_mode():
        _, state = run_block(block, name, components, received.state)
    return received.result(state)


class RemoteBlock(ModularPipelineBlocks):
    """Stands in for `block` inside a pipeline; runs it through `handle.run(call)`.

    It declares `block`'s contract (inputs, outputs, configs), except that of its components
    only the weight-free ones (schedulers, processors) stay here: they are sent with each call.
    The weights live with the deployment behind `handle`.
    """

    def __init__(self, block: ModularPipelineBlocks, name: str, model: str, handle: Any,
                 deployment: str | None = None) -> None:
        self.block = block
        self.name = name
        self.model = model
        self.handle = handle
        self.deployment = deployment or getattr(handle, "deployment_name", None)
        self.last_call_seconds: float | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> RemoteBlock:
        # Pipelines deep-copy their blocks; the handle is shared, not copied.
        return RemoteBlock(copy.deepcopy(self.block, memo), self.name, self.model, self.handle,
                           self.deployment)

    @property
    def description(self) -> str:
        return f"[remote: {self.deployment}] {self.block.description}"

    @property
    def expected_components(self) -> list[ComponentSpec]:
        return [spec for spec in self.block.expected_components
                if spec.default_creation_method == "from_config"]

    @property
    def expected_configs(self) -> list[ConfigSpec]:
        return self.block.expected_configs

    @property
    def inputs(self) -> list[InputParam]:
        return self.block.inputs

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        return self.block.intermediate_outputs

    @property
    def skippable(self) -> bool:
        return self.block.skippable

    def collect_execution(self, prefix, active):
        return self.block.collect_execution(prefix, active)

    def _would_run(self, state: PipelineState) -> bool:
        if not self.block.skippable:
            return True
        active = {key: True for key, value in state.values.items() if value is not None}
        return bool(self.block.collect_execution("", active))

    def __call__(self, components: Any, state: PipelineState) -> tuple[Any, PipelineState]:
        if not self._would_run(state):
            return components, state
        call, generators = pack_call(self.model, self.name, self.block, state,
                                     self._weightless(components))
        start = time.perf_counter()
        result = self._send(call)
        self.last_call_seconds = time.perf_counter() - start
        apply_result(result, generators, state)
        return components, state

    def stream(self, components: Any, state: PipelineState, options: Any) -> RemoteStream:
        """Run the block on the deployment's step scheduler (`handle.stream`), hearing each
        denoising step as it is done: see `RemoteStream`. `options` are the task's
        (`deployments.step_scheduler.TaskOptions`)."""
        return RemoteStream(self, components, state, options)

    def _weightless(self, components: Any) -> dict[str, Any]:
        found = {spec.name: getattr(components, spec.name, None)
                 for spec in self.expected_components}
        return {name: value for name, value in found.items() if value is not None}

    def _send(self, call: BlockCall) -> BlockResult:
        retry, overloaded = _replica_failures()
        for attempt in (1, 2):
            try:
                return self.handle.run.remote(call).result()
            except InvalidInput as error:
                # The caller's value, refused in the replica: Ray wraps it with the remote
                # traceback (`cause` holds the original), which is not the caller's business.
                raise getattr(error, "cause", error) from None
            except overloaded as error:
                wait = getattr(error, "retry_after_s", None)
                raise ReplicaUnavailable(self.deployment, f"queue full ({error})",
                                         max(1, math.ceil(wait or 1))) from error
            except retry as error:
                if attempt == 2:
                    raise ReplicaUnavailable(
                        self.deployment, f"replica failed twice ({type(error).__name__})"
                    ) from error
        raise AssertionError("unreachable")


def apply_result(result: BlockResult, generators: list[torch.Generator],
                 state: PipelineState) -> None:
    """A remote call's outputs into the caller's `state`, and its generators advanced as the
    remote draws advanced them."""
    for generator, new_state in zip(generators, result.generator_states, strict=True):
        generator.set_state(new_state)
    for key, value, kind in result.outputs:
        state.set(key, value, kind)


class RemoteStream:
    """One streamed run of a `RemoteBlock` on its deployment's step scheduler.

    Iterating yields the replica's `StepReport`s as the steps are done, then, last, the
    caller's state with the block's outputs set. `cancel()` (from any thread) cancels the call:
    the replica drops the task at its next step and the iteration raises `TaskStopped`. A
    replica that dies is sent the call once more (its steps are reported again from the first);
    a second failure, or a full queue, raises `ReplicaUnavailable`.
    """

    def __init__(self, remote: RemoteBlock, components: Any, state: PipelineState,
                 options: Any) -> None:
        self.remote = remote
        self.state = state
        self.options = options
        self.call, self.generators = pack_call(remote.model, remote.name, remote.block, state,
                                               remote._weightless(components))
        self._lock = threading.Lock()
        self._response: Any = None
        self._cancelled = False
        self.steps = 0

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            response = self._response
        if response is not None:
            response.cancel()

    def __iter__(self) -> Iterator[Any]:
        retry, overloaded = _replica_failures()
        deployment = self.remote.deployment
        for attempt in (1, 2):
            with self._lock:
                if self._cancelled:
                    raise TaskStopped(self.steps)
                self._response = self.remote.handle.options(stream=True).stream.remote(
                    self.call, self.options)
            try:
                for item in self._response:
                    if isinstance(item, BlockResult):
                        apply_result(item, self.generators, self.state)
                        yield self.state
                        return
                    self.steps = getattr(item, "step", self.steps)
                    yield item
                raise RuntimeError(f"deployment {deployment}: the stream ended without a result")
            except InvalidInput as error:  # the caller's value: as in `RemoteBlock._send`
                raise getattr(error, "cause", error) from None
            except overloaded as error:
                wait = getattr(error, "retry_after_s", None)
                raise ReplicaUnavailable(deployment, f"queue full ({error})",
                                         max(1, math.ceil(wait or 1))) from error
            except retry as error:
                if self._cancelled:
                    raise TaskStopped(self.steps) from error
                if attempt == 2:
                    raise ReplicaUnavailable(
                        deployment, f"replica failed twice ({type(error).__name__})"
                    ) from error
            except Exception as error:
                if self._cancelled:
                    raise TaskStopped(self.steps) from error
                raise


def remote_pipeline_blocks(
    blocks: ModularPipelineBlocks, model: str, handles: Mapping[str, Any],
    heavy_blocks: Mapping[str, HeavyRole],
) -> ModularPipelineBlocks:
    """A copy of `blocks` whose heavy top-level blocks (`heavy_blocks`: name -> role, the
    family's declaration) run through `handles[deployment]` ({deployment name: handle}, the
    deployment of each role in `ROLE_DEPLOYMENTS`); the others stay local. Blocks without such
    children come back as is."""
    blocks = copy.deepcopy(blocks)
    if not isinstance(blocks, CompositeBlocks):
        return blocks
    for name in list(blocks.sub_blocks):
        role = heavy_blocks.get(name)
        deployment = ROLE_DEPLOYMENTS.get(role) if role is not None else None
        if deployment is not None and deployment in handles:
            block = blocks.sub_blocks[name]
            blocks.sub_blocks[name] = RemoteBlock(block, name, model, handles[deployment],
                                                  deployment)
    return blocks
