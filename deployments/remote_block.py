"""`RemoteBlock`: a block that runs another block in another process, through a handle.

Every block declares what it reads and writes, so a block can run elsewhere: send exactly its
declared inputs, run it there on that process's components, write back its declared outputs.
The router swaps a family's heavy top-level blocks for RemoteBlocks; nothing else changes, so
no pipeline is defined twice (`remote_pipeline_blocks`).

What crosses the wire (`pack_call` / `BlockCall`): plain values, CPU tensors (Ray puts large
arguments in its object store), weight-free components the block expects (e.g. the request's
scheduler: it is small, and it is the router's choice), and generators as their *states*:
`torch.Generator` can't be pickled, so each is rebuilt remotely from `get_state()` and its
advanced state is sent back and set on the local generator — the next block draws the same
numbers it would have drawn in one process, which keeps images identical.

Failures: a block call is a pure function of what it sends (generator states included), so a
call whose replica died or became unreachable is sent once more — Serve routes it to a live
replica. If that fails too, or the deployment's queue is full (`max_queued_requests`), the
call raises `ReplicaUnavailable`, which the service answers with 503 and `Retry-After`.

Not handled here: which process runs the block (the handle decides), batching (the Denoiser),
and blocks that call the pipeline's step callback remotely: a remote denoise loop reports no
per-step progress, and is stopped by cancelling the pending call (`remote_cancel_check`).
"""

from __future__ import annotations

import contextvars
import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from blocks.block import ModularPipelineBlocks
from blocks.composites import CompositeBlocks
from blocks.errors import GenerationCancelled
from blocks.specs import ComponentSpec, ConfigSpec, InputParam, OutputParam
from blocks.state import PipelineState

# The heavy top-level blocks of the built-in families (SD, FLUX.2 klein), by role.
HEAVY_ROLES: dict[str, str] = {
    "text_encoder": "TextEncoder",
    "vae_encoder": "VAE",
    "denoise": "Denoiser",
    "decode": "VAE",
}

# Set by the caller's thread around a pipeline call: True once the call should stop. A remote
# call in flight is then cancelled (its `DeploymentResponse.cancel()`).
remote_cancel_check: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar(
    "blockserve_remote_cancel_check", default=None
)

CANCEL_POLL_S = 0.05
REPLICA_RETRY_AFTER_S = 5  # about what Serve needs to replace a dead replica


class ReplicaUnavailable(RuntimeError):
    """No replica of `deployment` could run the call now; retry in `retry_after` seconds."""

    def __init__(self, deployment: str | None, reason: str,
                 retry_after: int = REPLICA_RETRY_AFTER_S) -> None:
        super().__init__(f"deployment {deployment or 'unknown'} unavailable: {reason}")
        self.deployment = deployment
        self.retry_after = retry_after


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
    """One remote block call: which model's block, its inputs and the components it brings."""

    model: str
    block: str
    inputs: list[tuple[str, Any, str | None]]  # (name, encoded value, kwargs type)
    components: dict[str, Any] = field(default_factory=dict)  # weight-free, e.g. scheduler

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
    return BlockCall(model, name, inputs, components), generators


def run_call(
    block: ModularPipelineBlocks, name: str, components: Any, call: BlockCall
) -> BlockResult:
    """Run `call` on `block` in this process (the remote side of a RemoteBlock)."""
    from blocks.block import run_block

    generators: list[torch.Generator] = []
    state = PipelineState()
    sent: dict[str, Any] = {}
    for key, value, kind in call.inputs:
        decoded = _decode(value, generators)
        sent[key] = decoded
        state.set(key, decoded, kind)
    with torch.inference_mode():
        _, state = run_block(block, name, components, state)
    outputs = []
    for key, value in state.values.items():
        if key in sent and value is sent[key]:
            continue  # unchanged input: the caller has it
        kind = next((k for k, names in state.kwargs_mapping.items() if key in names), None)
        outputs.append((key, _encode(value, []), kind))
    return BlockResult(outputs, [g.get_state() for g in generators])


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
        weightless = {spec.name: getattr(components, spec.name, None)
                      for spec in self.expected_components}
        call, generators = pack_call(self.model, self.name, self.block, state,
                                     {k: v for k, v in weightless.items() if v is not None})
        start = time.perf_counter()
        result = self._send(call)
        self.last_call_seconds = time.perf_counter() - start
        for generator, new_state in zip(generators, result.generator_states, strict=True):
            generator.set_state(new_state)
        for key, value, kind in result.outputs:
            state.set(key, value, kind)
        return components, state

    def _send(self, call: BlockCall) -> BlockResult:
        retry, overloaded = _replica_failures()
        for attempt in (1, 2):
            try:
                return wait_cancellable(self.handle.run.remote(call))
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


def wait_cancellable(response: Any) -> Any:
    """`response.result()`, but cancel it (and raise `GenerationCancelled`) as soon as the
    caller's `remote_cancel_check` says so."""
    check = remote_cancel_check.get()
    if check is None:
        return response.result()
    while True:
        if check():
            response.cancel()
            raise GenerationCancelled(0, 0)
        try:
            return response.result(timeout_s=CANCEL_POLL_S)
        except TimeoutError:
            continue


def remote_pipeline_blocks(
    blocks: ModularPipelineBlocks, model: str, handles: dict[str, Any]
) -> ModularPipelineBlocks:
    """A copy of `blocks` whose heavy top-level blocks (`HEAVY_ROLES`) run through
    `handles[role]`; the others stay local. Blocks without such children come back as is."""
    blocks = copy.deepcopy(blocks)
    if not isinstance(blocks, CompositeBlocks):
        return blocks
    for name in list(blocks.sub_blocks):
        role = HEAVY_ROLES.get(name)
        if role is not None and role in handles:
            block = blocks.sub_blocks[name]
            blocks.sub_blocks[name] = RemoteBlock(block, name, model, handles[role], role)
    return blocks
