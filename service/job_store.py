"""Jobs clients can follow: their state, their ordered events, and how long they are kept.

A `JobRecord` is a job's `JobListener` (the engine tells it when the job is queued, starts and
finishes a step) and the place its outcome is written (result, error, cancellation). It keeps
the job's events in order — `queued`, `started`, `progress`..., then one of `completed`,
`failed`, `cancelled` — and hands them to subscribers on their asyncio loop, history first,
so a late subscriber misses nothing but old progress: only the newest `progress` event is
kept, which bounds a job's memory whatever its step count. Events are recorded on the engine's
thread and read on the server's loop; the record's lock orders them.

`JobStore` holds the records of `/v1/jobs`; finished ones are forgotten `ttl_seconds` after
they finish, or sooner, oldest first, when more than `max_finished` have finished or their
results hold more than `max_bytes` (a result carries its images as base64). Jobs not finished
yet are bounded by the engine's queue. Streaming generations use a record too, but never store
it.

Not handled here: persistence (jobs die with the process), and encoding images (previews
stay PIL images here; whoever sends them encodes them).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from PIL import Image

from service.jobs import GenerationJob

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    "queued", "running", "succeeded", "failed", "cancelled")
FINISHED = (SUCCEEDED, FAILED, CANCELLED)
TERMINAL_EVENTS = {SUCCEEDED: "completed", FAILED: "failed", CANCELLED: "cancelled"}


@dataclass(frozen=True)
class JobEvent:
    seq: int  # 1, 2, ... per job: the SSE event id
    type: str  # queued | started | progress | completed | failed | cancelled
    data: dict[str, Any]  # JSON-ready
    previews: tuple[Image.Image, ...] = ()  # progress only, when asked for

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS.values()


class JobRecord:
    """One job's state and events (see the module docstring)."""

    def __init__(self, job: GenerationJob) -> None:
        self.job = job
        self.id = job.id
        self.created = int(time.time())
        self._lock = threading.Lock()
        self.state = QUEUED
        self.position: int | None = None
        self.step = 0
        self.total_steps = job.steps
        self.started_at: float | None = None  # monotonic
        self.finished_at: float | None = None  # monotonic
        self.result: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self._events: list[JobEvent] = []
        self._seq = 0
        self._subscribers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[JobEvent]]] = []

    # -- the engine's listener -----------------------------------------------------------

    def queued(self, position: int) -> None:
        with self._lock:
            self.position = position
            self._publish("queued", {"position": position})

    def started(self) -> None:
        with self._lock:
            if self.state != QUEUED:  # a batch retried alone starts its members again
                return
            self.state, self.position = RUNNING, None
            self.started_at = time.monotonic()
            self._publish("started", {})

    def progress(self, step: int, total: int, previews: list[Image.Image] | None) -> None:
        with self._lock:
            if self.state != RUNNING:
                return
            self.step, self.total_steps = step, total
            self._publish("progress", {"step": step, "total_steps": total},
                          tuple(previews or ()))

    # -- outcomes ------------------------------------------------------------------------

    def succeed(self, result: dict[str, Any]) -> None:
        self._finish(SUCCEEDED, result=result)

    @property
    def result_bytes(self) -> int:
        """About what the result holds: its base64 images (and URLs) dominate."""
        result = self.result
        if result is None:
            return 0
        return sum(len(item.get("b64_json") or "") + len(item.get("url") or "")
                   for item in result.get("data", ()))

    def fail(self, error: dict[str, Any]) -> None:
        self._finish(FAILED, error=error)

    def mark_cancelled(self, error: dict[str, Any]) -> None:
        self._finish(CANCELLED, error=error)

    def _finish(self, state: str, result: dict[str, Any] | None = None,
                error: dict[str, Any] | None = None) -> None:
        with self._lock:
            if self.state in FINISHED:
                return
            self.state, self.position = state, None
            self.finished_at = time.monotonic()
            self.result, self.error = result, error
            data = {"step": self.step, "total_steps": self.total_steps}
            if result is not None:
                data["result"] = result
            if error is not None:
                data["error"] = error
            self._publish(TERMINAL_EVENTS[state], data)
            self._subscribers.clear()

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    # -- events --------------------------------------------------------------------------

    def _publish(self, kind: str, data: dict[str, Any],
                 previews: tuple[Image.Image, ...] = ()) -> None:
        self._seq += 1
        event = JobEvent(self._seq, kind, {"type": kind, "job_id": self.id, **data}, previews)
        if kind == "progress" and self._events and self._events[-1].type == "progress":
            self._events[-1] = event  # history keeps only the newest progress
        else:
            self._events.append(event)
        for loop, queue in self._subscribers:
            with contextlib.suppress(RuntimeError):  # a closed loop: that subscriber is gone
                loop.call_soon_threadsafe(queue.put_nowait, event)

    def subscribe(
        self, loop: asyncio.AbstractEventLoop
    ) -> tuple[list[JobEvent], asyncio.Queue[JobEvent] | None]:
        """(the events so far, a queue of the ones to come — None when finished)."""
        with self._lock:
            history = list(self._events)
            if self.finished:
                return history, None
            queue: asyncio.Queue[JobEvent] = asyncio.Queue()
            self._subscribers.append((loop, queue))
            return history, queue

    def unsubscribe(self, queue: asyncio.Queue[JobEvent] | None) -> None:
        with self._lock:
            self._subscribers = [(lp, q) for lp, q in self._subscribers if q is not queue]

    # -- the status view -----------------------------------------------------------------

    def eta_seconds(self, now: float | None = None) -> float | None:
        """Seconds left at the pace so far; None until a step is done or once finished."""
        with self._lock:
            if self.state != RUNNING or not self.step or self.started_at is None:
                return None
            elapsed = (time.monotonic() if now is None else now) - self.started_at
            return round(elapsed / self.step * max(self.total_steps - self.step, 0), 3)

    def status(self, position: int | None = None) -> dict[str, Any]:
        """The job as `GET /v1/jobs/{id}` shows it (`position`: the engine's, when queued)."""
        eta = self.eta_seconds()
        with self._lock:
            return {
                "id": self.id,
                "object": "image.job",
                "model": self.job.model,
                "status": self.state,
                "created": self.created,
                "position": (position if position is not None else self.position)
                if self.state == QUEUED else None,
                "step": self.step,
                "total_steps": self.total_steps,
                "eta_seconds": eta,
                "result": self.result,
                "error": self.error,
            }


async def follow(
    history: list[JobEvent], queue: asyncio.Queue[JobEvent] | None, after: int = 0,
    idle_seconds: float = 15.0,
) -> AsyncIterator[JobEvent | None]:
    """A subscription's events (`JobRecord.subscribe`) with `seq > after`, history first, up to
    the terminal one; None after every `idle_seconds` without an event (time for a keepalive)."""
    for event in history:
        if event.seq > after:
            yield event
        if event.terminal:
            return
    while queue is not None:
        try:
            event = await asyncio.wait_for(queue.get(), idle_seconds)
        except asyncio.TimeoutError:
            yield None
            continue
        yield event
        if event.terminal:
            return


class JobStore:
    """The `/v1/jobs` records; finished ones kept for `ttl_seconds`, and `max_finished` and
    `max_bytes` of results at most (oldest forgotten first)."""

    def __init__(self, ttl_seconds: float, max_finished: int, max_bytes: int = 128 * 2**20
                 ) -> None:
        self.ttl_seconds = ttl_seconds
        self.max_finished = max_finished
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._records: OrderedDict[str, JobRecord] = OrderedDict()

    def add(self, record: JobRecord) -> None:
        with self._lock:
            self._purge()
            self._records[record.id] = record

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            self._purge()
            return self._records.get(job_id)

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    def _purge(self) -> None:
        now = time.monotonic()
        finished = [r for r in self._records.values() if r.finished_at is not None]
        finished.sort(key=lambda r: r.finished_at or 0.0)
        excess = len(finished) - self.max_finished
        held = sum(record.result_bytes for record in finished)
        for index, record in enumerate(finished):
            assert record.finished_at is not None
            expired = now - record.finished_at > self.ttl_seconds
            if index < excess or held > self.max_bytes or expired:
                del self._records[record.id]
                held -= record.result_bytes
