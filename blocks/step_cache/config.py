"""Step-caching methods and their parameters: what a user may ask for, checked in one place.

A `StepCacheConfig` names one method and its parameters:

- `fbcache` (First-Block Cache): run the denoiser's first block; when its residual changed less
  than `threshold` (relative L1 against the last fully computed step), reuse the rest of the
  network's residual from that step instead of running it.
- `teacache` (Timestep-Embedding-Aware Cache): the relative L1 change of the first block's
  timestep-modulated input, rescaled by a polynomial fitted per model (`coefficients`, highest
  power first; identity by default), is accumulated over steps; while the sum
  stays below `threshold` the whole stack of blocks is skipped and its last residual reused.
  The first and last steps always run fully.
- `deepcache`: UNets only. Every `interval`-th step of a request runs the whole UNet and keeps
  the deep features entering its outer `branch` up levels; the steps between run only those
  outer levels (the shallow path) on the kept features.

Which methods a model supports depends on its class (`blocks.step_cache.hooks`).

Not handled here: the decisions and the hooks (`state`, `hooks`, `runner`), where a service
reads configs from (the service's models file and requests).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

OFF = "off"


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a method: its type, default and bounds (inclusive)."""

    kind: type
    default: Any
    low: float | None = None
    high: float | None = None
    description: str = ""


METHODS: dict[str, dict[str, ParamSpec]] = {
    "fbcache": {
        "threshold": ParamSpec(float, 0.1, 0.0, 100.0,
                               "reuse when the first block's residual changed less than this"),
    },
    "teacache": {
        "threshold": ParamSpec(float, 0.3, 0.0, 100.0,
                               "skip while the accumulated rescaled input change stays below"),
        "coefficients": ParamSpec(list, (1.0, 0.0), None, None,
                                  "rescaling polynomial, highest power first (identity default)"),
    },
    "deepcache": {
        "interval": ParamSpec(int, 3, 1, 1000, "a full UNet pass every this many steps"),
        "branch": ParamSpec(int, 1, 1, 16, "outer UNet levels that run on cached steps"),
    },
}


class InvalidStepCache(ValueError):
    """A step-cache setting that names an unknown method or parameter, or a bad value; the
    message names the field and the allowed values."""


@dataclass(frozen=True)
class StepCacheConfig:
    """One method and its parameters (defaults filled in); hashable, so requests with equal
    configs can be told apart from others cheaply."""

    method: str
    params: tuple[tuple[str, Any], ...] = field(default=())

    def get(self, name: str) -> Any:
        return dict(self.params)[name]

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method,
                **{k: list(v) if isinstance(v, tuple) else v for k, v in self.params}}

    def __str__(self) -> str:
        params = ", ".join(f"{k}={list(v) if isinstance(v, tuple) else v}"
                           for k, v in self.params)
        return f"{self.method}({params})"


def _check_param(method: str, name: str, value: Any, spec: ParamSpec, owner: str) -> Any:
    where = f"{owner}.{name}"
    if spec.kind is list:
        if (not isinstance(value, (list, tuple)) or not value
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                           for v in value)):
            raise InvalidStepCache(f"{where}: expected a non-empty list of numbers, got {value!r}")
        return tuple(float(v) for v in value)
    if spec.kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidStepCache(f"{where}: expected an integer, got {value!r}")
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidStepCache(f"{where}: expected a number, got {value!r}")
    if (spec.low is not None and value < spec.low) or (spec.high is not None
                                                         and value > spec.high):
        raise InvalidStepCache(
            f"{where}: {value!r} is out of range; allowed {spec.low} to {spec.high}")
    return spec.kind(value)


def step_cache_config(value: str | Mapping[str, Any] | StepCacheConfig | None,
                      owner: str = "step_cache",
                      allowed: tuple[str, ...] | None = None) -> StepCacheConfig | None:
    """A checked config from a method name (`"fbcache"`), a mapping (`{"method": "fbcache",
    "threshold": 0.05}`), a config, or `None`/`"off"` (no caching: returns None).

    `allowed` limits the methods (those the model supports); errors name `owner` and list the
    allowed values."""
    if value is None or value == OFF:
        return None
    methods = tuple(METHODS) if allowed is None else allowed
    choices = ", ".join((OFF, *methods))
    if isinstance(value, StepCacheConfig):
        mapping: dict[str, Any] = value.as_dict()
    elif isinstance(value, str):
        mapping = {"method": value}
    elif isinstance(value, Mapping):
        mapping = dict(value)
    else:
        raise InvalidStepCache(f"{owner}: expected a method name or a mapping with 'method'; "
                               f"allowed methods: {choices}")
    method = mapping.pop("method", None)
    if method == OFF and not mapping:
        return None
    if method not in methods:
        raise InvalidStepCache(f"{owner}: unknown method {method!r}; allowed: {choices}")
    specs = METHODS[method]
    unknown = sorted(set(mapping) - set(specs))
    if unknown:
        raise InvalidStepCache(f"{owner}: unknown parameter {unknown[0]!r} for {method}; "
                               f"allowed: {', '.join(specs)}")
    params = tuple(
        (name, _check_param(method, name, mapping[name], spec, owner) if name in mapping
         else spec.default)
        for name, spec in specs.items())
    return StepCacheConfig(method, params)
