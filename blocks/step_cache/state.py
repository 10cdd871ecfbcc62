"""What one request remembers between its denoising steps, and the per-method decisions.

A `StepCache` belongs to one request (one denoise loop): its config, the loop's step count
when known, and one `CacheSlot` per model pass (conditional and unconditional passes of a
guided FLUX.2 step are separate forwards with separate memories). A slot holds the tensors of
its request's rows only, so its decisions never depend on what else shares a forward: a
request decides the same alone or batched.

Decisions (`decide`) are per slot and per step, from the slot's memory and, for `fbcache` and
`teacache`, the probe the model hooks measured for this step (the first block's residual; its
modulated input). The counters (`full`, `cached`) count the forwards a slot ran fully and
those whose deep part it skipped.

Not handled here: measuring probes and reusing residuals inside a model (`hooks` and the
families' hook modules), grouping requests into sub-forwards (`runner`).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from blocks.step_cache.config import StepCacheConfig


def relative_l1(now: torch.Tensor, before: torch.Tensor) -> float:
    """mean |now - before| / mean |before|, in double precision."""
    now, before = now.detach().double(), before.detach().double()
    return float((now - before).abs().mean() / before.abs().mean().clamp_min(1e-12))


@dataclass
class CacheSlot:
    """One request's memory for one model pass."""

    forwards: int = 0  # forwards decided so far
    full: int = 0
    cached: int = 0
    # method-specific tensors: "reference" (fbcache: first-block residual at the last full
    # step; teacache: last modulated input), "residual" (what the skipped blocks added at the
    # last full step), "deep" (deepcache: the features entering the shallow up levels)
    memory: dict[str, torch.Tensor] = field(default_factory=dict)
    accumulated: float = 0.0  # teacache's rescaled change since the last full step
    probe: Any = None  # this step's probe result, until the step's forward ran
    replay: Any = None  # what the probe computed that the step's forward reuses (fbcache)

    def count(self, cached: bool) -> None:
        self.forwards += 1
        if cached:
            self.cached += 1
        else:
            self.full += 1


class StepCache:
    """One request's step cache: `config`, `total` steps if known (teacache then runs the last
    step fully) and a slot per model pass. A pass runs one forward per step, so a slot's
    `forwards` is the index of the step being decided."""

    def __init__(self, config: StepCacheConfig, total: int | None = None) -> None:
        self.config = config
        self.total = total
        self.slots: dict[Hashable, CacheSlot] = {}

    def slot(self, key: Hashable) -> CacheSlot:
        return self.slots.setdefault(key, CacheSlot())

    @property
    def full(self) -> int:
        return sum(slot.full for slot in self.slots.values())

    @property
    def cached(self) -> int:
        return sum(slot.cached for slot in self.slots.values())

    def __repr__(self) -> str:
        return f"StepCache({self.config}, full={self.full}, cached={self.cached})"


def decide(cache: StepCache, slot: CacheSlot) -> bool:
    """Whether `slot` skips the deep part of its next forward (True = cached). Updates the
    slot's reference memory as the method prescribes; the forward then fills in the rest."""
    method = cache.config.method
    if method == "deepcache":
        interval = cache.config.get("interval")
        return "deep" in slot.memory and slot.forwards % interval != 0
    if method == "fbcache":
        residual = slot.probe  # (R, S, D) first block's residual this step
        reference = slot.memory.get("reference")
        if (reference is not None and "residual" in slot.memory
                and relative_l1(residual, reference) < cache.config.get("threshold")):
            return True  # the reference stays that of the last full step
        slot.memory["reference"] = residual
        return False
    if method == "teacache":
        modulated = slot.probe  # (R, S, D) first block's modulated input this step
        previous = slot.memory.get("reference")
        slot.memory["reference"] = modulated
        last = cache.total is not None and slot.forwards >= cache.total - 1
        if previous is None or "residual" not in slot.memory or last:
            slot.accumulated = 0.0
            return False
        change = relative_l1(modulated, previous)
        slot.accumulated += rescale(cache.config.get("coefficients"), change)
        if slot.accumulated < cache.config.get("threshold"):
            return True
        slot.accumulated = 0.0
        return False
    raise ValueError(f"step cache: no decision rule for method {method!r}")


def rescale(coefficients: tuple[float, ...], x: float) -> float:
    """The polynomial `coefficients` (highest power first) at x (Horner's rule)."""
    value = 0.0
    for c in coefficients:
        value = value * x + c
    return value
