"""The values that flow between blocks.

`PipelineState` is the shared store of one pipeline call: every user input and every
intermediate value, each optionally tagged with a kwargs type. `BlockState` is the view one
block works on: exactly its declared inputs, as attributes. Neither knows about blocks.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any


class PipelineState:
    """All values of one pipeline call, by name, with optional kwargs-type tags."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.kwargs_mapping: dict[str, list[str]] = {}
        # Called by denoise loops after every step: (step, timestep, block_state) -> stop?
        # Kept apart from `values` because it is runtime wiring, not data a block declares.
        self.step_callback: Callable[[int, Any, BlockState], bool | None] | None = None

    def set(self, key: str, value: Any, kwargs_type: str | None = None) -> None:
        self.values[key] = value
        if kwargs_type is not None:
            names = self.kwargs_mapping.setdefault(kwargs_type, [])
            if key not in names:
                names.append(key)

    def get(self, keys: str | Iterable[str], default: Any = None) -> Any:
        """One value, or a dict of values when given several keys."""
        if isinstance(keys, str):
            return self.values.get(keys, default)
        return {key: self.values.get(key, default) for key in keys}

    def get_by_kwargs(self, kwargs_type: str) -> dict[str, Any]:
        """Every value tagged with `kwargs_type`, in the order they were set."""
        return {key: self.values[key] for key in self.kwargs_mapping.get(kwargs_type, [])}

    def __contains__(self, key: str) -> bool:
        return key in self.values

    def __getattr__(self, name: str) -> Any:
        # `pipe(...).images`: values read as attributes. Only reached when normal lookup fails.
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(f"PipelineState has no value {name!r}; it has: {list(values)}")

    def copy(self) -> PipelineState:
        """A copy whose dicts are new (values themselves are shared, not deep-copied)."""
        other = PipelineState()
        other.values = dict(self.values)
        other.kwargs_mapping = copy.deepcopy(self.kwargs_mapping)
        other.step_callback = self.step_callback
        return other

    def to_dict(self) -> dict[str, Any]:
        return dict(self.values)

    def __repr__(self) -> str:
        lines = [f"  {key}: {_short_repr(value)}" for key, value in self.values.items()]
        tags = [f"  {kind}: {names}" for kind, names in self.kwargs_mapping.items()]
        body = "\n".join(lines) or "  (empty)"
        if tags:
            body += "\n kwargs types:\n" + "\n".join(tags)
        return f"PipelineState(\n{body}\n)"


class BlockState:
    """The attributes one block reads and writes while it runs."""

    __slots__ = ("_values",)

    def __init__(self, **values: Any) -> None:
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # keeps copy/pickle probing away from the values
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"BlockState has no value {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self._values[name] = value

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._values[key] = value

    def __contains__(self, key: str) -> bool:
        return key in self._values

    def __getstate__(self) -> dict[str, Any]:
        return {"values": self._values}

    def __setstate__(self, data: dict[str, Any]) -> None:
        object.__setattr__(self, "_values", data["values"])

    def get(self, key: str, default: Any = None) -> Any:
        return self._values.get(key, default)

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def __repr__(self) -> str:
        items = ", ".join(f"{k}={_short_repr(v)}" for k, v in self._values.items())
        return f"BlockState({items})"


def _short_repr(value: Any) -> str:
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype"):
        return f"{type(value).__name__}(shape={tuple(shape)}, dtype={value.dtype})"
    if isinstance(value, list) and len(value) > 4:
        return f"list(len={len(value)})"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
