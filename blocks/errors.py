"""Exceptions the library raises on purpose, so callers can tell them from bugs."""

from __future__ import annotations


class GenerationCancelled(Exception):
    """A step callback asked to stop; the pipeline call ended early and cleanly."""

    def __init__(self, step: int, total: int | None = None) -> None:
        self.step = step
        self.total = total
        of_total = f" of {total}" if total is not None else ""
        super().__init__(f"generation cancelled after step {step + 1}{of_total}")
