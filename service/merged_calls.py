"""Running one top-level block (text encoding, decoding...) once for several requests.

The engine keeps one `PipelineState` per request and runs a pipeline's top-level blocks for
every request that reaches them at the same time. Where their inputs allow, a block runs once
for all of them on a merged state, then each request gets its own share of the outputs back:

- A *per-image* value is a tensor whose first dimension, or a list whose length, is the
  request's image count (the engine gives every request one prompt, generator... per image, so
  its inputs have that form). Merged, they are concatenated in request order; outputs of that
  form (first dimension or length = all requests' images) are split back, and `batch_size`
  (the image count every family's text encoder outputs) becomes each request's own.
- Every other input must be equal in all the requests merged (the same guidance scale, output
  type...); requests whose values differ run in separate calls. Outputs of another form are
  shared values (e.g. a size), given to each request.

Merging never changes a request's result: the models compute each image independently under
the batch-invariant kernels the engine runs them with. A merged call that fails is retried for
each request alone, so only the request that caused it fails.

Not handled here: the denoise loop (`deployments.step_scheduler` shares its steps), choosing
when to run a block (the engine).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from blocks import ModularPipelineBlocks, PipelineState
from blocks.block import run_block

IMAGE_COUNT = "batch_size"  # the output naming a state's number of images


@dataclass
class Member:
    """One request's part of a merged call: the components it runs with, its state, and its
    number of images."""

    components: Any
    state: PipelineState
    images: int


def _inputs(block: ModularPipelineBlocks, state: PipelineState) -> dict[str, tuple[Any, Any]]:
    """{name: (value, kwargs type)} of the block's declared inputs present in `state`."""
    values: dict[str, tuple[Any, Any]] = {}
    for param in block.inputs:
        if param.name is None:  # a kwargs-type group: every value tagged with it
            for key, value in state.get_by_kwargs(param.kwargs_type).items():
                values[key] = (value, param.kwargs_type)
        elif state.get(param.name) is not None:
            values[param.name] = (state.get(param.name), param.kwargs_type)
    return values


def _per_image(value: Any, images: int) -> bool:
    if isinstance(value, torch.Tensor):
        return value.ndim > 0 and value.shape[0] == images
    return isinstance(value, list) and len(value) == images


def _row_form(value: Any) -> tuple[Any, ...]:
    """What concatenated per-image values must share: shape after the first dim, dtype."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape[1:]), value.dtype, value.device)
    return ("list",)


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, (str, int, float, bool, tuple, type(None))) and type(a) is type(b):
        return a == b
    return False


def _fits(head: tuple[Member, dict], other: tuple[Member, dict]) -> bool:
    """Whether `other` can be merged with the group led by `head`."""
    (head_member, head_inputs), (member, inputs) = head, other
    if head_inputs.keys() != inputs.keys():
        return False
    for name, (value, kind) in inputs.items():
        first, first_kind = head_inputs[name]
        if kind != first_kind:
            return False
        rows = _per_image(first, head_member.images) and _per_image(value, member.images)
        if rows:
            if _row_form(first) != _row_form(value):
                return False
        elif not _same(first, value):
            return False
    return True


def _merge(group: list[tuple[Member, dict]]) -> tuple[PipelineState, dict[str, Any]]:
    merged = PipelineState()
    sent: dict[str, Any] = {}
    head_inputs = group[0][1]
    for name, (first, kind) in head_inputs.items():
        values = [inputs[name][0] for _, inputs in group]
        if all(_per_image(v, m.images) for v, (m, _) in zip(values, group, strict=True)):
            if isinstance(first, torch.Tensor):
                value: Any = torch.cat(values)
            else:
                value = [item for each in values for item in each]
        else:
            value = first
        merged.set(name, value, kind)
        sent[name] = value
    return merged, sent


def _split(merged: PipelineState, sent: dict[str, Any], members: list[Member]) -> None:
    """Each member's share of the merged call's new values, set on its own state."""
    total = sum(member.images for member in members)
    starts = [sum(m.images for m in members[:i]) for i in range(len(members))]
    for key, value in merged.values.items():
        if key in sent and value is sent[key]:
            continue  # an input passed through unchanged
        kind = next((k for k, names in merged.kwargs_mapping.items() if key in names), None)
        for member, start in zip(members, starts, strict=True):
            share = value
            if key == IMAGE_COUNT and value == total:
                share = member.images
            elif isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == total:
                share = value[start:start + member.images].clone()
            elif isinstance(value, list) and len(value) == total:
                share = value[start:start + member.images]
            member.state.set(key, share, kind)


def run_merged(
    block: ModularPipelineBlocks,
    name: str,
    members: Sequence[Member],
    observe: Callable[[float], None] | None = None,
) -> list[Exception | None]:
    """Run `block` (top-level, called `name`) for every member, merged where their inputs
    allow (module docstring); each member's state gets its outputs. Returns each member's
    error, or None. `observe(seconds)` is told each call's duration."""
    errors: list[Exception | None] = [None] * len(members)
    described = [(member, _inputs(block, member.state)) for member in members]
    groups: list[list[int]] = []
    for index, entry in enumerate(described):
        for group in groups:
            if _fits(described[group[0]], entry):
                group.append(index)
                break
        else:
            groups.append([index])

    def alone(index: int) -> None:
        member = members[index]
        start = time.perf_counter()
        try:
            member.components, member.state = run_block(block, name, member.components,
                                                        member.state)
        except Exception as error:  # this request's own failure
            errors[index] = error
        finally:
            if observe is not None:
                observe(time.perf_counter() - start)

    for group in groups:
        if len(group) == 1:
            alone(group[0])
            continue
        merged, sent = _merge([described[i] for i in group])
        start = time.perf_counter()
        try:
            _, merged = run_block(block, name, members[group[0]].components, merged)
        except Exception:  # one request's inputs, probably: each runs alone to find it
            for index in group:
                alone(index)
            continue
        if observe is not None:
            observe(time.perf_counter() - start)
        _split(merged, sent, [members[i] for i in group])
    return errors
