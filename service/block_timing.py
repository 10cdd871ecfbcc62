"""Time each top-level block of a pipeline, for the `blockserve_block_duration_seconds` metric.

`with_block_timing(blocks, observe)` gives the blocks object a subclass of its own class whose
`__call__` runs the children exactly as `SequentialPipelineBlocks` does and reports
`observe(child_name, seconds)` after each. The class keeps its name, declarations, workflows and
repr, so nothing else can tell; the library itself stays free of any metrics code. Blocks whose
root is not a sequence (rare) are timed as one block named after their class.

Deliberately not handled: nested blocks (the denoise loop's steps are one "denoise" sample) and
time spent waiting for a component to be moved onto the device (it counts towards the block).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from blocks import ModularPipelineBlocks, SequentialPipelineBlocks
from blocks.block import run_block
from blocks.state import PipelineState

BlockObserver = Callable[[str, float], None]


def _timed_sequence_call(
    self: Any, components: Any, state: PipelineState
) -> tuple[Any, PipelineState]:
    for name, block in self.sub_blocks.items():
        start = time.perf_counter()
        try:
            components, state = run_block(block, name, components, state)
        finally:
            self._observe_block(name, time.perf_counter() - start)
    return components, state


def _timed_root_call(
    self: Any, components: Any, state: PipelineState
) -> tuple[Any, PipelineState]:
    start = time.perf_counter()
    try:
        return super(type(self), self).__call__(components, state)
    finally:
        self._observe_block(type(self).__name__, time.perf_counter() - start)


def with_block_timing(
    blocks: ModularPipelineBlocks, observe: BlockObserver
) -> ModularPipelineBlocks:
    """`blocks`, changed in place to report each top-level block's duration to `observe`."""
    cls = type(blocks)
    sequence = isinstance(blocks, SequentialPipelineBlocks)
    call = _timed_sequence_call if sequence else _timed_root_call
    timed = type(
        cls.__name__,
        (cls,),
        {
            "__call__": call,
            "_observe_block": staticmethod(observe),
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
        },
    )
    blocks.__class__ = timed
    return blocks
