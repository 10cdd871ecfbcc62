"""Exceptions the library raises on purpose, so callers can tell them from bugs.

- `InvalidInput`: the caller passed a value the blocks can't use (a prompt that is not text,
  a reference image too small, a strength outside [0, 1]); the message names the block path,
  the input and what is allowed. The service answers it with 400. Any other exception out of
  a pipeline is a bug (a block that did not set a declared output, a miswired tree) and the
  service answers 500.
- `Unavailable`: the work could not run now for want of capacity (a full queue, a dead
  replica, a server shutting down), through no fault of the request; retry after
  `retry_after` seconds. Raised by the serving layers, declared here so that both of them
  (`service`, `deployments`) can see it.
- `GenerationCancelled`: a step callback asked to stop.

Not handled here: mapping these to HTTP (`service.generation`).
"""

from __future__ import annotations

from typing import Any


class InvalidInput(ValueError):
    """A caller's value the blocks can't use; `param` names the input when there is one."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self) -> tuple[Any, ...]:  # keeps `param` across processes (Ray mode)
        return (type(self), (str(self), self.param))


class Unavailable(RuntimeError):
    """No capacity to run the work now; retry in about `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class GenerationCancelled(Exception):
    """A step callback asked to stop; the pipeline call ended early and cleanly."""

    def __init__(self, step: int, total: int | None = None) -> None:
        self.step = step
        self.total = total
        of_total = f" of {total}" if total is not None else ""
        super().__init__(f"generation cancelled after step {step + 1}{of_total}")
