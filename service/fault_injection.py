"""Test-only faults inside the pipeline, switched on by `BLOCKSERVE_TEST_HOOKS=true` only.

Some behaviour can only be shown with a request that passes every HTTP check and then goes
wrong while the model runs (a step-mate that fails; a job slow enough to cancel mid-run).
With the setting on, the engine's step hook reads markers in a job's prompt after each of its
denoising steps:

    [[fail]]         the job fails with `InjectedFault` after its first step (alone: the jobs
                     it shares steps with go on)
    [[slow:50ms]]    each of its steps is followed by a 50 ms pause of the thread that reports
                     it: in embedded mode the step scheduler's, so every job stepping meanwhile
                     slows down too (in Ray mode the router's, which only delays its events)

Off by default; never enable it in production, as any client could then fail or slow the
engine on purpose.
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
