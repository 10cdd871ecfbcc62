"""Hooks on a denoiser model that let one forward skip its deep part for cached requests.

A model class that supports step caching registers a `ModelCacheHooks` subclass
(`register_cache_hooks`; FLUX.2's transformer and SD-family UNets do, in their family
folders). `install_cache_hooks(model)` wraps the model's submodules once; the wrappers do
nothing unless a `CacheCall` is active (`cache_call(...)`, set by `blocks.step_cache.runner`
around one forward), so a model with hooks installed computes exactly what it computed before
whenever caching is off.

Within one forward every request has the same method and the same decision (the runner makes
one sub-forward per kind), so a hook never slices a batch: it splits tensors by the call's
`rows` only to read and write each request's own memory (`CacheSlot`). Modes:

- `probe`: measure what the method decides on (stored per slot as `slot.probe`), then stop
  the forward by raising `ProbeDone` (a `BaseException`, so code that isolates model failures
  with `except Exception` lets it through);
- `full`: run everything and remember, per slot, what a cached forward will reuse;
- `cached`: skip the deep part, reusing each slot's memory.

Not handled here: the decisions (`state.decide`), which requests share a forward (`runner`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from blocks.step_cache.config import StepCacheConfig
from blocks.step_cache.state import CacheSlot

Mode = Literal["probe", "full", "cached"]


class ProbeDone(BaseException):
    """Raised by a hook once a probe forward has measured what it needed."""


@dataclass
class CacheCall:
    """The requests of the forward being run: their shared method config and mode, their
    slots and row counts (in batch order), and scratch values the hooks pass each other."""

    config: StepCacheConfig
    mode: Mode
    slots: list[CacheSlot]
    rows: list[int]
    scratch: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.config.method

    def member(self, index: int) -> CacheCall:
        """This call narrowed to its `index`-th request (to run that request alone)."""
        return CacheCall(self.config, self.mode, [self.slots[index]], [self.rows[index]])

    def split(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """A (sum of rows, ...) tensor as one owned copy per request."""
        if len(self.rows) == 1:
            return [tensor.clone()]
        return [part.clone() for part in tensor.split(self.rows)]

    def gather(self, key: str) -> torch.Tensor:
        """The requests' `memory[key]` tensors as one (sum of rows, ...) batch."""
        parts = [slot.memory[key] for slot in self.slots]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def keep(self, key: str, tensor: torch.Tensor) -> None:
        """Store each request's rows of `tensor` as its `memory[key]`."""
        for slot, part in zip(self.slots, self.split(tensor), strict=True):
            slot.memory[key] = part

    def keep_probe(self, tensor: torch.Tensor) -> None:
        for slot, part in zip(self.slots, self.split(tensor), strict=True):
            slot.probe = part


_CALL: ContextVar[CacheCall | None] = ContextVar("blocks_step_cache_call", default=None)


def current_call() -> CacheCall | None:
    """The active `CacheCall`, or None (caching off: hooks pass everything through)."""
    return _CALL.get()


@contextlib.contextmanager
def cache_call(call: CacheCall | None) -> Iterator[CacheCall | None]:
    token = _CALL.set(call)
    try:
        yield call
    finally:
        _CALL.reset(token)


Wrapper = Callable[..., Any]


def wrap_forward(module: torch.nn.Module, wrapper: Wrapper) -> None:
    """Make `module(...)` call `wrapper(original_forward, *args, **kwargs)`; torch's own hooks
    keep working (they run around `forward`)."""
    original = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        return wrapper(original, *args, **kwargs)

    module.forward = forward  # type: ignore[method-assign]
    module._step_cache_original_forward = original  # type: ignore[assignment]


def unwrap_forward(module: torch.nn.Module) -> None:
    original = module.__dict__.pop("_step_cache_original_forward", None)
    if original is not None:
        module.__dict__.pop("forward", None)


class ModelCacheHooks:
    """Caching hooks for one model class: `methods` it supports, `wrap(model)` installing the
    wrappers (each reads `current_call()`), and `probes(method)`: whether a method needs a probe
    forward before it can decide."""

    model_class: type
    methods: tuple[str, ...] = ()

    def wrap(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """Wrap the model's submodules; return the wrapped ones."""
        raise NotImplementedError

    def probes(self, method: str) -> bool:
        return method in ("fbcache", "teacache")

    def check(self, config: StepCacheConfig, model: torch.nn.Module,
              owner: str = "step_cache") -> None:
        """Raise `InvalidStepCache` (naming `owner`) if `config` cannot work on `model`."""


_HOOKS: dict[type, ModelCacheHooks] = {}


def register_cache_hooks(hooks: ModelCacheHooks) -> None:
    """Make models of `hooks.model_class` (and its subclasses) cacheable with its methods."""
    _HOOKS[hooks.model_class] = hooks


def hooks_for(model: Any) -> ModelCacheHooks | None:
    """The hooks registered for `model`'s class (or for `model` itself, a class), or None."""
    for cls in (model if isinstance(model, type) else type(model)).__mro__:
        if cls in _HOOKS:
            return _HOOKS[cls]
    return None


def cache_methods(model: Any) -> tuple[str, ...]:
    """The step-cache methods `model` supports (none for an unregistered class)."""
    hooks = hooks_for(model)
    return () if hooks is None else hooks.methods


def cacheable_component(components: Mapping[str, Any]) -> torch.nn.Module | None:
    """The first of a pipeline's `components` whose class has caching hooks (its denoiser),
    or None."""
    for component in components.values():
        if isinstance(component, torch.nn.Module) and hooks_for(component) is not None:
            return component
    return None


def cacheable_class(specs: Iterable[Any]) -> type | None:
    """The first class of the component specs `specs` (`ComponentSpec`s) that has caching
    hooks, or None: what a caller that does not hold the denoiser (a Ray router) can cache."""
    for spec in specs:
        hint = getattr(spec, "type_hint", None)
        if isinstance(hint, type) and hooks_for(hint) is not None:
            return hint
    return None


def install_cache_hooks(model: torch.nn.Module) -> ModelCacheHooks:
    """Install the model class's hooks once (idempotent); returns them. Raises ValueError
    naming the class when none are registered."""
    hooks = hooks_for(model)
    if hooks is None:
        known = ", ".join(sorted(cls.__name__ for cls in _HOOKS)) or "(none)"
        raise ValueError(f"step cache: no caching hooks for {type(model).__name__}; "
                         f"cacheable model classes: {known}")
    if getattr(model, "_step_cache_wrapped", None) is None:
        model._step_cache_wrapped = hooks.wrap(model)  # type: ignore[assignment]
    return hooks


def remove_cache_hooks(model: torch.nn.Module) -> None:
    """Undo `install_cache_hooks` (and the call routing of `context.step_caching`)."""
    for module in model.__dict__.pop("_step_cache_wrapped", None) or ():
        unwrap_forward(module)
    for name in model.__dict__.pop("_step_cache_routed", None) or ():
        model.__dict__.pop(name, None)

