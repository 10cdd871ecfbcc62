"""Step caching: skip the part of a denoiser's work the next step would redo.

Methods (`config.METHODS`): `fbcache` and `teacache` for FLUX.2's transformer, `deepcache` for
SD-family UNets. They are hooks on the denoiser model (registered per model class by the
families), active only inside a forward that `runner.run_cached` runs for requests that asked
for caching; each request keeps its own memory and decisions (`state.StepCache`).

    with step_caching(pipe.transformer, {"method": "fbcache", "threshold": 0.1}, total=20):
        image = pipe(prompt="a red circle", num_inference_steps=20).images[0]

A loop that batches requests calls `run_cached` itself, one `StepCache` per request:

    cache = StepCache(step_cache_config({"method": "fbcache", "threshold": 0.1}), total=20)

Not handled here: batching requests into steps (the step scheduler), serving.
"""

from blocks.step_cache.config import (
    METHODS,
    OFF,
    InvalidStepCache,
    StepCacheConfig,
    step_cache_config,
)
from blocks.step_cache.context import step_caching
from blocks.step_cache.hooks import (
    ModelCacheHooks,
    cache_methods,
    cacheable_class,
    cacheable_component,
    hooks_for,
    install_cache_hooks,
    register_cache_hooks,
    remove_cache_hooks,
)
from blocks.step_cache.runner import CachedMember, SubForward, run_cached
from blocks.step_cache.state import CacheSlot, StepCache

__all__ = [
    "METHODS",
    "OFF",
    "CacheSlot",
    "CachedMember",
    "InvalidStepCache",
    "ModelCacheHooks",
    "StepCache",
    "StepCacheConfig",
    "SubForward",
    "cache_methods",
    "cacheable_class",
    "cacheable_component",
    "hooks_for",
    "install_cache_hooks",
    "register_cache_hooks",
    "remove_cache_hooks",
    "run_cached",
    "step_cache_config",
    "step_caching",
]
