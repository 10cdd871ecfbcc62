"""Engines run generation jobs; routes only `submit` and await the future.

`Engine` is the interface the HTTP layer depends on. `SerialEngine` runs one job at a time on
one worker thread, in arrival order, behind a bounded queue (a full queue is `EngineBusy`, which
the API turns into 503 with Retry-After). A batching engine can replace it behind the same
interface: jobs carry a `batch_key` and one generator per image, so batching changes no image.

Not handled here: validation (jobs arrive valid), HTTP, priorities.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from typing import Protocol

from blocks import GenerationCancelled
from service.jobs import GenerationJob, GenerationResult, run_job
from service.registry import ModelRegistry

logger = logging.getLogger(__name__)


class EngineBusy(RuntimeError):
    """The engine's queue is full, or it is shutting down; retry later."""


class Engine(Protocol):
    """What the routes need from an engine."""

    def start(self) -> None:
        """Start worker(s); idempotent."""

    def stop(self) -> None:
        """Finish the running job, fail queued ones, stop worker(s)."""

    def submit(self, job: GenerationJob) -> Future[GenerationResult]:
        """Queue `job`; the future resolves to its result or the error it raised.
        Raises `EngineBusy` when no more jobs can be queued."""

    @property
    def queued(self) -> int:
        """Jobs waiting to run (not counting the running one)."""


_STOP = object()


class SerialEngine:
    """One job at a time, in order, on one worker thread."""

    def __init__(self, registry: ModelRegistry, queue_size: int = 64) -> None:
        self._registry = registry
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._work, name="blockserve-engine", daemon=True
                )
                self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is None:
            return
        self._drain(EngineBusy("the server is shutting down"))
        self._queue.put(_STOP)
        thread.join(timeout)

    def submit(self, job: GenerationJob) -> Future[GenerationResult]:
        future: Future[GenerationResult] = Future()
        try:
            self._queue.put_nowait((job, future))
        except queue.Full:
            raise EngineBusy(f"{self._queue.maxsize} jobs are already waiting") from None
        return future

    def _drain(self, error: Exception) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                _job, future = item  # type: ignore[misc]
                if future.set_running_or_notify_cancel():
                    future.set_exception(error)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            job, future = item  # type: ignore[misc]
            if not future.set_running_or_notify_cancel():
                continue  # cancelled while queued
            try:
                if job.cancelled.is_set():
                    raise GenerationCancelled(-1)
                result = run_job(self._registry.get(job.model), job)
            except Exception as error:  # a failed job never stops the worker
                future.set_exception(error)
            else:
                future.set_result(result)
