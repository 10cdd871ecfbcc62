"""`InsertableDict`: the ordered mapping that holds a composite block's sub-blocks.

A plain dict keeps order but cannot insert at a position; pipelines are edited by inserting a
block before another one, so that is the operation this type adds.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any


class InsertableDict(OrderedDict):
    """An ordered dict with `insert(key, value, index)`."""

    def insert(self, key: str, value: Any, index: int) -> None:
        """Put `key` at position `index` (negative counts from the end, like `list.insert`)."""
        if key in self:
            raise KeyError(f"{key!r} is already present; pop it or use a different name")
        items = list(self.items())
        items.insert(index, (key, value))
        self.clear()
        self.update(items)

    def __repr__(self) -> str:
        lines = [
            f"  [{i}] {key} ({type(value).__name__})" for i, (key, value) in enumerate(self.items())
        ]
        return "InsertableDict(\n" + "\n".join(lines) + "\n)" if lines else "InsertableDict()"
