"""One step's model forwards for a group of requests, with their own step-cache decisions.

`run_cached(model, members, call)` takes the requests that would share one forward (each with
its `StepCache` or None, its pass key and its row count) and `call(indices)`, which runs one
model forward on those members' rows (and keeps its outputs: the caller's business). It

1. runs a probe forward for the members whose method needs one (`fbcache`, `teacache`; one
   probe per distinct config, on all of that config's members together);
2. decides per member (`state.decide`): full or cached;
3. runs one sub-forward per kind — (config, decision), members without caching together —
   with the matching `CacheCall` active, so the model's hooks skip or remember per request.

A request's rows are computed by the same kernels whether its sub-forward holds other
requests or not, and its decision reads only its own memory; under
`blocks.batch_invariance.batch_invariant()` a request's output is the same batched or alone.

Not handled here: which requests form a group (the caller: the step scheduler, or
`context.step_caching` for a single loop), the outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from blocks.step_cache.config import StepCacheConfig
from blocks.step_cache.hooks import CacheCall, ProbeDone, cache_call, install_cache_hooks
from blocks.step_cache.state import CacheSlot, StepCache, decide


@dataclass(frozen=True)
class CachedMember:
    """One request's part of a forward: its step cache (None: caching off), pass key, rows."""

    cache: StepCache | None
    key: Hashable
    rows: int


@dataclass(frozen=True)
class SubForward:
    """One model forward `run_cached` made: its members (indices), method and mode."""

    members: tuple[int, ...]
    method: str | None  # None: members without caching
    mode: str  # "full" or "cached"


def run_cached(model: torch.nn.Module, members: Sequence[CachedMember],
               call: Callable[[list[int]], Any]) -> list[SubForward]:
    """Run one step's forwards for `members` (module docstring); returns the sub-forwards
    made, in order (probes excluded)."""
    slots: list[CacheSlot | None] = [
        None if m.cache is None else m.cache.slot(m.key) for m in members]
    by_config: dict[StepCacheConfig, list[int]] = {}
    plain: list[int] = []
    for index, member in enumerate(members):
        if member.cache is None:
            plain.append(index)
        else:
            by_config.setdefault(member.cache.config, []).append(index)
    if not by_config:
        call(plain)
        return [SubForward(tuple(plain), None, "full")]
    hooks = install_cache_hooks(model)

    def context(config: StepCacheConfig, mode: str, indices: list[int]) -> CacheCall:
        return CacheCall(config, mode, [slots[i] for i in indices],  # type: ignore[misc]
                         [members[i].rows for i in indices])

    kinds: dict[tuple[StepCacheConfig | None, bool], list[int]] = {}
    if plain:
        kinds[(None, False)] = plain
    try:
        for config, indices in by_config.items():
            probing = hooks.probes(config.method)
            if probing:
                try:
                    with cache_call(context(config, "probe", indices)):
                        call(indices)
                except ProbeDone:
                    pass
                else:
                    raise RuntimeError(f"step cache: {type(model).__name__}'s probe for "
                                       f"{config.method} did not stop the forward")
            for index in indices:
                if probing and slots[index].probe is None:
                    continue  # its probe forward failed: the caller keeps its error
                cached = decide(members[index].cache, slots[index])  # type: ignore[arg-type]
                slots[index].count(cached)  # type: ignore[union-attr]
                kinds.setdefault((config, cached), []).append(index)
        made = []
        for (config, cached), indices in sorted(kinds.items(), key=lambda kv: kv[1][0]):
            mode = "cached" if cached else "full"
            if config is None:
                call(indices)
            else:
                with cache_call(context(config, mode, indices)):
                    call(indices)
            made.append(SubForward(tuple(indices), None if config is None else config.method,
                                   mode))
        return made
    finally:
        for slot in slots:
            if slot is not None:
                slot.probe = slot.replay = None
