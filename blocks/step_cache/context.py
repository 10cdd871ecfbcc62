"""Step caching for any loop that calls the denoiser itself: `with step_caching(model, ...)`.

The families' denoise loops call their denoiser once per pass per step and know nothing of
caching. Inside `step_caching(model, config)`, each of the model's top-level calls is routed
through `run_cached` as one request (all its rows share one decision), keyed by the pass
name the loop gives `model.cache_context(name)` (FLUX.2's loop names "cond" and "uncond"; a
model called without one has a single pass). So a user adds caching to a pipeline without
touching it:

    with step_caching(pipe.transformer, {"method": "fbcache", "threshold": 0.1},
                      total=20) as cache:
        image = pipe(prompt="a red circle", num_inference_steps=20).images[0]
    cache.full, cache.cached  # forwards run fully, forwards whose deep part was skipped

`config` None or "off" changes nothing. Callers that batch several requests into one
forward with their own decisions (the step scheduler) call `run_cached` directly; a call
made inside one of its sub-forwards passes straight through here.

Not handled here: the decisions and hooks (`state`, `hooks`, the families' hook modules).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from typing import Any

import torch

from blocks.step_cache.config import StepCacheConfig, step_cache_config
from blocks.step_cache.hooks import cache_methods, current_call, install_cache_hooks
from blocks.step_cache.runner import CachedMember, run_cached
from blocks.step_cache.state import StepCache

DEFAULT_PASS = "forward"

# id(model) -> the StepCache its calls use inside `step_caching`
_ACTIVE: ContextVar[Mapping[int, StepCache] | None] = ContextVar("blocks_step_cache_active",
                                                                default=None)
_PASS: ContextVar[str] = ContextVar("blocks_step_cache_pass", default=DEFAULT_PASS)


def _rows(args: tuple, kwargs: dict) -> int:
    for name in ("hidden_states", "sample"):  # FLUX.2 transformer, UNet
        if isinstance(kwargs.get(name), torch.Tensor):
            return kwargs[name].shape[0]
    return args[0].shape[0]


def _route_calls(model: torch.nn.Module) -> None:
    """Wrap `model`'s forward (and `cache_context`, when it has one) once so that its calls
    inside `step_caching` go through `run_cached`."""
    if "_step_cache_routed" in model.__dict__:
        return
    original = model.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        cache = (_ACTIVE.get() or {}).get(id(model))
        if cache is None or current_call() is not None:
            return original(*args, **kwargs)
        results: list[Any] = []
        run_cached(model, [CachedMember(cache, _PASS.get(), _rows(args, kwargs))],
                   lambda _indices: results.append(original(*args, **kwargs)))
        return results[-1]  # a probe forward stops before returning anything

    model.forward = forward  # type: ignore[method-assign]
    named = getattr(model, "cache_context", None)
    if named is not None:
        @contextlib.contextmanager
        def cache_context(name: str, **kwargs: Any) -> Iterator[None]:
            token = _PASS.set(name)
            try:
                with named(name, **kwargs):
                    yield
            finally:
                _PASS.reset(token)

        model.cache_context = cache_context  # type: ignore[method-assign]
    # what `remove_cache_hooks` pops to undo this
    model._step_cache_routed = ("forward", "cache_context")  # type: ignore[assignment]


@contextlib.contextmanager
def step_caching(model: torch.nn.Module,
                 config: str | Mapping[str, Any] | StepCacheConfig | None,
                 total: int | None = None) -> Iterator[StepCache | None]:
    """Cache `model`'s steps with `config` (module docstring) for the calls made inside;
    yields the `StepCache` (None when `config` is off). `total`: the loop's step count, when
    known (teacache runs the last step fully). Raises `InvalidStepCache` for a method the
    model does not support, naming the allowed ones."""
    checked = step_cache_config(config, allowed=cache_methods(model))
    if checked is None:
        yield None
        return
    install_cache_hooks(model).check(checked, model)
    _route_calls(model)
    cache = StepCache(checked, total=total)
    token = _ACTIVE.set({**(_ACTIVE.get() or {}), id(model): cache})
    try:
        yield cache
    finally:
        _ACTIVE.reset(token)
