"""`AutoOffloadStrategy`: which resident models to offload so that one more fits, decided from
the device's free memory, with the call signature diffusers' offload strategies have.

`ComponentsManager.enable_auto_offload(device, offload_strategy=...)` asks a strategy before
it places each model: `strategy(hooks, model_id, model, execution_device)` gets the idle
resident models (objects with `.model_id` and `.model`) and returns those to offload. This one
offloads nothing while the model fits in free memory minus `memory_reserve_margin`, else the
set with the smallest total size that frees enough (the manager's own `plan_eviction`), else
everything it was offered.

Not handled here: moving models (the manager does), budgets in bytes (the manager's
`memory_budget`), devices without a free-memory query other than CUDA's.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

import torch

from blocks.components_manager import EvictionCandidate, plan_eviction

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class ResidentModel(Protocol):
    model_id: str
    model: Any


def parse_size(size: int | str) -> int:
    """Bytes in `size`: an int, or a string such as "3GB" (10**9) or "512MiB" (2**20)."""
    if isinstance(size, int):
        return size
    match = _SIZE.match(str(size))
    if match is None:
        raise ValueError(
            f"memory size {size!r}: give bytes as an int or a string like '3GB' or '512MiB' "
            f"(units: {', '.join(_UNITS)})"
        )
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "B").upper()])


def model_bytes(model: Any) -> int:
    """A model's weight bytes (parameters and buffers)."""
    footprint = getattr(model, "get_memory_footprint", None)
    if footprint is not None:
        return int(footprint())
    if isinstance(model, torch.nn.Module):
        tensors = [*model.parameters(), *model.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)
    raise AttributeError(f"cannot tell the memory footprint of a {type(model).__name__}")


def free_device_memory(device: torch.device | str) -> int:
    """Free bytes on `device` right now (CUDA only)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"AutoOffloadStrategy: no free-memory query for {device}; use CUDA, or "
                         "give the manager a memory_budget instead")
    return int(torch.cuda.mem_get_info(device)[0])


class AutoOffloadStrategy:
    """Offload the smallest set of idle resident models that lets `model` fit in free device
    memory minus `memory_reserve_margin`; all of them when no set is enough."""

    def __init__(self, memory_reserve_margin: int | str = "3GB") -> None:
        self.memory_reserve_margin = parse_size(memory_reserve_margin)

    def __call__(
        self,
        hooks: list[ResidentModel],
        model_id: str,
        model: Any,
        execution_device: torch.device | str,
    ) -> list[ResidentModel]:
        if not hooks:
            return []
        room = free_device_memory(execution_device) - self.memory_reserve_margin
        need = model_bytes(model) - room
        if need <= 0:
            return []
        # Largest first, so that among sets of equal size the larger models' set wins.
        ordered = sorted(hooks, key=lambda hook: -model_bytes(hook.model))
        candidates = [
            EvictionCandidate(hook.model_id, model_bytes(hook.model), tick)
            for tick, hook in enumerate(ordered)
        ]
        plan = plan_eviction(candidates, need)
        if plan is None:
            return list(hooks)
        chosen = set(plan)
        return [hook for hook in hooks if hook.model_id in chosen]
