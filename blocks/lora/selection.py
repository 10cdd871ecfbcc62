"""Which adapters a model call uses, set for the calls in a `with` block.

Adapters loaded into a model are applied according to, in this order:

1. `adapters_per_sample(rows)` — one adapter set per batch row (`rows[i]`: adapter name ->
   scale; empty for none). This is how requests with different adapters share one batched
   forward: each row gets its own low-rank deltas (`blocks.lora.layers`).
2. `adapters_for_call({name: scale})` — one set for every row of every call.
3. otherwise the model's own active set (`set_adapters`, diffusers' semantics).

Both contexts are `contextvars`, so they hold for the calling thread (or task) only: two
engine workers sharing one model each see their own. Scales are kept as Python floats and
multiplied by a module's `alpha / r` in double precision before the one cast to the tensor's
dtype, so a row's scale is the same number whichever way it was selected.

Not handled here: loading adapters or checking their names (the pipeline does), applying them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

AdapterSet = Mapping[str, float]


@dataclass
class RowAdapters:
    """Adapter sets of a batch's rows, grouped by adapter in a fixed (sorted) order, so a row's
    deltas are added in the same order whatever else is in its batch."""

    rows: int
    # adapter -> (row indices, None when every row has it; scale per row, float64)
    groups: dict[str, tuple[list[int] | None, torch.Tensor]]
    _on_device: dict[tuple[str, torch.device], torch.Tensor | None] = field(default_factory=dict)
    _scales: dict[tuple, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, rows: Sequence[AdapterSet]) -> RowAdapters:
        names = sorted({name for row in rows for name in row})
        groups = {}
        for name in names:
            index = [i for i, row in enumerate(rows) if name in row]
            scales = torch.tensor([float(rows[i][name]) for i in index], dtype=torch.float64)
            groups[name] = (None if len(index) == len(rows) else index, scales)
        return cls(len(rows), groups)

    def index(self, name: str, device: torch.device) -> torch.Tensor | None:
        """The rows using `name` as an index tensor on `device` (cached), or None for all."""
        key = (name, device)
        if key not in self._on_device:
            rows = self.groups[name][0]
            self._on_device[key] = None if rows is None else torch.tensor(rows, device=device)
        return self._on_device[key]

    def scales(self, name: str, scaling: float, dims: int, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
        """Each of `name`'s rows' scale times a module's `scaling` (alpha / r), shaped to
        multiply a (rows, ...) tensor of `dims` dimensions; cached per value."""
        key = (name, scaling, dims, dtype, device)
        if key not in self._scales:
            values = (self.groups[name][1] * scaling).to(device, dtype)  # float64 product
            self._scales[key] = values.reshape(-1, *([1] * (dims - 1)))
        return self._scales[key]


_PER_SAMPLE: ContextVar[RowAdapters | None] = ContextVar("blocks_lora_per_sample", default=None)
_FOR_CALL: ContextVar[dict[str, float] | None] = ContextVar("blocks_lora_for_call", default=None)


@contextlib.contextmanager
def adapters_per_sample(rows: Sequence[AdapterSet]) -> Iterator[None]:
    """Within the block, a model call on a batch of `len(rows)` rows applies `rows[i]`'s
    adapters (name -> scale) to row i only (module docstring)."""
    token = _PER_SAMPLE.set(RowAdapters.of(rows))
    try:
        yield
    finally:
        _PER_SAMPLE.reset(token)


@contextlib.contextmanager
def adapters_for_call(adapters: AdapterSet | None) -> Iterator[None]:
    """Within the block, every model call applies `adapters` (name -> scale; empty: none)
    instead of the models' active sets. `None` changes nothing."""
    if adapters is None:
        yield
        return
    token = _FOR_CALL.set({name: float(scale) for name, scale in adapters.items()})
    outer = _PER_SAMPLE.set(None)
    try:
        yield
    finally:
        _PER_SAMPLE.reset(outer)
        _FOR_CALL.reset(token)


def current_rows() -> RowAdapters | None:
    return _PER_SAMPLE.get()


def current_call_adapters() -> dict[str, float] | None:
    return _FOR_CALL.get()
