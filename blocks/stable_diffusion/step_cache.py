"""Step caching for SD-family UNets: `deepcache` as hooks on the UNet's levels.

A UNet runs conv_in -> down levels -> mid block -> up levels -> conv_out, each up level taking
its down twin's skip connections. With `branch` = b, the outer b down levels and the outer b
up levels are the shallow path; everything between is the deep path, whose result enters the
first shallow up level. A full forward runs everything and remembers, per request, that deep
result; a cached forward runs only the shallow path: the inner down levels return their input
(and as many placeholder skip connections as they would have made, which only the skipped up
levels would read), the mid block returns its input, and the innermost skipped up level
returns the remembered features. Decisions need no probe: a request runs fully every
`interval`-th of its forwards.

Not handled here: decisions, grouping requests (`blocks.step_cache`), the denoise loop (which
is unchanged: caching lives entirely in these hooks).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DConditionModel

from blocks.step_cache.config import InvalidStepCache, StepCacheConfig
from blocks.step_cache.hooks import CacheCall, ModelCacheHooks, current_call, wrap_forward


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _deep(call: CacheCall | None, level: int | None) -> bool:
    """Whether level `level` (0 = outermost; None = the mid block, always deep) is on the deep
    path for this call."""
    return (call is not None and call.method == "deepcache"
            and (level is None or level >= call.config.get("branch")))


class UNetDeepCacheHooks(ModelCacheHooks):
    model_class = UNet2DConditionModel
    methods = ("deepcache",)

    def probes(self, method: str) -> bool:
        return False

    def wrap(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        levels = len(model.down_blocks)
        wrapped: list[torch.nn.Module] = []
        for level, block in enumerate(model.down_blocks):
            wrap_forward(block, self._down(level, block))
            wrapped.append(block)
        if model.mid_block is not None:
            wrap_forward(model.mid_block, self._mid)
            wrapped.append(model.mid_block)
        for index, block in enumerate(model.up_blocks):
            wrap_forward(block, self._up(levels - 1 - index))  # up_blocks[0] is the innermost
            wrapped.append(block)
        return wrapped

    def check(self, config: StepCacheConfig, model: torch.nn.Module,
              owner: str = "step_cache") -> None:
        levels = len(model.down_blocks)
        if config.get("branch") >= levels:
            raise InvalidStepCache(
                f"{owner}.branch: {config.get('branch')} leaves no deep path in a UNet of "
                f"{levels} levels; allowed 1 to {levels - 1}")

    @staticmethod
    def _down(level: int, block: torch.nn.Module) -> Any:
        skips = len(block.resnets) + (0 if getattr(block, "downsamplers", None) is None else 1)

        def down(original: Any, *args: Any, **kwargs: Any) -> Any:
            call = current_call()
            if _deep(call, level) and call.mode == "cached":  # type: ignore[union-attr]
                hidden = _hidden(args, kwargs)
                return hidden, (hidden,) * skips  # placeholders: read by skipped levels only
            return original(*args, **kwargs)

        return down

    @staticmethod
    def _mid(original: Any, *args: Any, **kwargs: Any) -> Any:
        call = current_call()
        if _deep(call, None) and call.mode == "cached":  # type: ignore[union-attr]
            return _hidden(args, kwargs)
        return original(*args, **kwargs)

    def _up(self, level: int) -> Any:
        def up(original: Any, *args: Any, **kwargs: Any) -> Any:
            call = current_call()
            if not _deep(call, level):
                return original(*args, **kwargs)
            innermost_shallow = call.config.get("branch") - 1  # type: ignore[union-attr]
            if call.mode == "cached":  # type: ignore[union-attr]
                if level == innermost_shallow + 1:
                    return call.gather("deep")  # type: ignore[union-attr]
                return _hidden(args, kwargs)
            out = original(*args, **kwargs)
            if level == innermost_shallow + 1:
                call.keep("deep", out)  # type: ignore[union-attr]
            return out

        return up
