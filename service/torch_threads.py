"""How many intra-op threads torch gets by default in a process that generates on the CPU.

Torch's default is one thread per core. On a machine whose cores are busy with other work that
default stalls: every op waits at an OpenMP barrier for the thread whose core is taken, so a
tiny model's thousands of small ops each wait for a scheduler slice (measured on 2 cores with
one busy: 15-22 s per 64x64 image against 0.55 s with one thread). So blockserve leaves one
core for everything else (the HTTP loop, encoding, other processes) and splits the rest
between the engine's workers: `max(1, (cores - 1) // workers)`.

`OMP_NUM_THREADS` (the standard knob, which torch reads itself) and `BLOCKSERVE_TORCH_THREADS`
win over this default. Not handled here: GPUs (their kernels don't use these threads), Ray
mode (each replica sets its own, `deployments.heavy`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping


def available_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_torch_threads(workers: int = 1, cores: int | None = None,
                          environ: Mapping[str, str] | None = None,
                          configured: int | None = None) -> int | None:
    """The thread count to set, or None to leave torch's (OMP_NUM_THREADS is set)."""
    if configured is not None:
        return configured
    environ = os.environ if environ is None else environ
    if environ.get("OMP_NUM_THREADS", "").strip():
        return None
    cores = available_cores() if cores is None else cores
    return max(1, (cores - 1) // max(1, workers))


def apply_torch_threads(workers: int = 1, configured: int | None = None) -> int:
    """Set torch's intra-op threads to the default above; returns the count in force."""
    import torch

    threads = default_torch_threads(workers, configured=configured)
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return torch.get_num_threads()
