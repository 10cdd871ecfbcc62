"""Test-only faults inside the pipeline, switched on by `BLOCKSERVE_TEST_HOOKS=true` only.

Some behaviour can only be shown with a request that passes every HTTP check and then goes
wrong while the model runs (a batch-mate that fails; a job slow enough to cancel mid-run).
With the setting on, the engine's step hook reads markers in a job's prompt:

    [[fail]]         the job's pipeline call raises `InjectedFault` after its first step
    [[slow:50ms]]    every step of the job's pipeline call takes at least 50 ms longer

A marker acts on the whole pipeline call the job is in (that is the point: its batch-mates
are affected and must be retried alone, or wait). Off by default; never enable it in
production, as any client could then fail or slow the engine on purpose.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence

from service.jobs import GenerationJob

FAIL_MARKER = "[[fail]]"
_SLOW_MARKER = re.compile(r"\[\[slow:(\d{1,5})ms\]\]")


class InjectedFault(RuntimeError):
    """The failure a `[[fail]]` prompt asks for."""


def fault_injection_hook(jobs: Sequence[GenerationJob], step: int) -> None:
    """The engine's step hook when test hooks are on (see the module docstring)."""
    delay_ms = 0
    for job in jobs:
        if FAIL_MARKER in job.prompt:
            raise InjectedFault(f"injected fault for job {job.id} at step {step + 1}")
        match = _SLOW_MARKER.search(job.prompt)
        if match is not None:
            delay_ms = max(delay_ms, int(match.group(1)))
    if delay_ms:
        time.sleep(delay_ms / 1000)
