"""Engines run generation jobs; routes only `submit`, `cancel`, and await the future.

`Engine` is the interface the HTTP layer depends on (the Ray placement implements it too).
`BatchingEngine` is the embedded one: a bounded FIFO queue and worker threads (one by
default) that each run batches of compatible jobs, each batch one pipeline call
(`service.batch`) on the worker's own pipeline objects (the weights are shared).

- Back-pressure: `submit` never blocks. A full queue raises `QueueFull` (429 with
  Retry-After, estimated from recent batch times); a stopped engine `EngineStopped` (503).
- Batching: the worker takes the oldest job, then every queued job with the same
  `batch_key` (model, workflow, size, steps, guidance, scheduler, strength, negative prompt
  given or not) in arrival order, up to the model's `max_batch_size` images. When that is not
  enough and the oldest job arrived less than `batch_window_s` ago, it waits for more until
  then: an idle server adds at most the window to a request's latency, a busy one nothing
  (jobs queue up behind the running batch anyway). Incompatible jobs wait their turn; the
  oldest job always runs next, so nothing starves. A job asking for more images than the cap
  runs alone. Edits (an input image) always run alone.
- Failure isolation: jobs are validated before they are queued; if a batched call still
  fails, each member is retried alone, so only the job that caused it fails.
- Stopping: `cancel(job)` drops a queued job at once (its slot is free immediately) and stops
  a running one at its next denoising step without stopping its batch-mates; a job past its
  deadline (`timeout_seconds` after submission, queue time included) is stopped the same way.

- Workers: one model call at a time is what one accelerator does well, so the default is one
  worker. On a CPU a small model can't keep every core busy with intra-op threads; there,
  `workers` > 1 runs that many batches at once, each on cores / workers torch threads (set
  when the engine starts). Workers take batches from the one queue, oldest first.

Not handled here: validation, HTTP, priorities (the Ray placement scales out instead of up).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from service.batch import StepHook, run_batch
from service.jobs import CANCELLED, GenerationJob, GenerationResult
from service.registry import LoadedModel, ModelRegistry

logger = logging.getLogger(__name__)

QUEUED, RUNNING = "queued", "running"  # where a job was when it stopped (a metric label)


class EngineBusy(RuntimeError):
    """No job can be queued now; retry in about `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 2) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QueueFull(EngineBusy):
    """The queue holds as many jobs as it may (HTTP 429)."""


class EngineStopped(EngineBusy):
    """The engine is shutting down (HTTP 503)."""


class EngineObserver(Protocol):
    """What an engine reports (the app's metrics implement it)."""

    def job_started(self, model: str, queue_seconds: float) -> None: ...

    def batch_started(self, model: str, images: int) -> None: ...

    def job_stopped(self, model: str, reason: str, stage: str) -> None:
        """A job was cancelled or timed out (`reason`) while `stage` (queued or running)."""


class Engine(Protocol):
    """What the routes need from an engine."""

    def start(self) -> None:
        """Start worker(s); idempotent."""

    def stop(self) -> None:
        """Finish the running batch, fail queued jobs with `EngineStopped`, stop worker(s)."""

    def submit(self, job: GenerationJob) -> Future[GenerationResult]:
        """Queue `job`; the future resolves to its result or the error it ended with
        (`GenerationCancelled`, `GenerationTimedOut`, or what the pipeline raised).
        Raises `EngineBusy` (`QueueFull`, `EngineStopped`) when it can't be queued."""

    def cancel(self, job: GenerationJob, reason: str = CANCELLED) -> bool:
        """Stop `job`: dropped now if queued, at its next step if running. True if this
        call stopped it (False: it had already stopped or finished)."""

    @property
    def queued(self) -> int:
        """Jobs waiting to run."""

    @property
    def running(self) -> int:
        """Jobs in the batch running now."""


def _share_cores(workers: int) -> None:
    """Give each of `workers` concurrent model calls its share of the cores: more intra-op
    threads than cores in all makes OpenMP threads wait on each other (many times slower)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = min(torch.get_num_threads(), max(1, (cores or 1) // workers))
    if threads != torch.get_num_threads():
        logger.info("engine: %d workers, %d torch threads each", workers, threads)
        torch.set_num_threads(threads)


@dataclass(eq=False)
class _Entry:
    job: GenerationJob
    future: Future[GenerationResult] = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)


def _resolve(future: Future[Any], result: Any = None, error: BaseException | None = None) -> None:
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:  # cancelled by its caller meanwhile: nobody is waiting
        pass


class BatchingEngine:
    """Batches of compatible jobs, one pipeline call each, on `workers` threads."""

    def __init__(
        self,
        registry: ModelRegistry,
        queue_size: int = 64,
        max_batch_size: int = 8,
        batch_window_s: float = 0.005,
        observer: EngineObserver | None = None,
        step_hook: StepHook | None = None,
        workers: int = 1,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self._registry = registry
        self.queue_size = queue_size
        self.max_batch_size = max_batch_size
        self.batch_window_s = batch_window_s
        self.workers = workers
        self._observer = observer
        self._step_hook = step_hook
        self._cond = threading.Condition()
        self._pending: list[_Entry] = []  # arrival order
        self._running: dict[int, list[_Entry]] = {}  # worker -> its batch
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._batch_seconds = 1.0  # moving average, for Retry-After

    # -- the interface -------------------------------------------------------------------

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._pending)

    @property
    def running(self) -> int:
        with self._cond:
            return sum(len(batch) for batch in self._running.values())

    def start(self) -> None:
        if self.workers > 1:
            _share_cores(self.workers)
        with self._cond:
            self._stopping = False
            self._threads = [thread for thread in self._threads if thread.is_alive()]
            if not self._threads:
                self._threads = [
                    threading.Thread(target=self._work, args=(worker,), daemon=True,
                                     name=f"blockserve-engine-{worker}")
                    for worker in range(self.workers)
                ]
                for thread in self._threads:
                    thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        with self._cond:
            self._stopping = True
            dropped, self._pending = self._pending, []
            threads, self._threads = self._threads, []
            self._cond.notify_all()
        for entry in dropped:
            _resolve(entry.future, error=EngineStopped("the server is shutting down"))
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def submit(self, job: GenerationJob) -> Future[GenerationResult]:
        with self._cond:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            if len(self._pending) >= self.queue_size:
                raise QueueFull(f"{len(self._pending)} jobs are already waiting",
                                self._retry_after())
            entry = _Entry(job)
            self._pending.append(entry)
            if job.listener is not None:  # under the lock: `queued` always comes first
                job.listener.queued(len(self._pending) - 1)
            self._cond.notify_all()
        return entry.future

    def cancel(self, job: GenerationJob, reason: str = CANCELLED) -> bool:
        stopped = job.cancel(reason)
        with self._cond:
            entry = next((e for e in self._pending if e.job is job), None)
            if entry is not None:
                self._pending.remove(entry)
                self._cond.notify_all()
        if entry is not None:
            self._stopped(entry, job.stop_error(), QUEUED)
        return stopped

    def position(self, job: GenerationJob) -> int | None:
        """How many jobs are ahead of `job` in the queue; None when it is not queued."""
        with self._cond:
            for index, entry in enumerate(self._pending):
                if entry.job is job:
                    return index
        return None

    # -- the worker ----------------------------------------------------------------------

    def _retry_after(self) -> int:
        batches_ahead = (len(self._pending) / self.max_batch_size + 1) / self.workers
        return max(1, min(60, math.ceil(self._batch_seconds * batches_ahead)))

    def _cap(self, job: GenerationJob) -> int:
        try:
            configured = self._registry.config(job.model).max_batch_size
        except KeyError:
            configured = None
        return configured or self.max_batch_size

    def _work(self, worker: int) -> None:
        while True:
            stopped, batch = self._next_batch(worker)
            for entry in stopped:
                self._stopped(entry, entry.job.stop_error(), QUEUED)
            if batch is None:
                return
            if not batch:
                continue
            try:
                self._run(batch, worker)
            except Exception:  # a bug here must not kill the worker: fail the batch
                logger.exception("engine: running a batch failed unexpectedly")
                for entry in batch:
                    _resolve(entry.future, error=RuntimeError("internal engine error"))
            finally:
                with self._cond:
                    self._running.pop(worker, None)

    def _next_batch(self, worker: int) -> tuple[list[_Entry], list[_Entry] | None]:
        """(queued jobs found stopped, to resolve; the next batch, taken off the queue, or
        [] to look again, or None once stopping)."""
        with self._cond:
            while True:
                expired = self._take_expired()
                if expired:
                    return expired, []
                if self._stopping:
                    return [], None
                if not self._pending:
                    self._cond.wait()
                    continue
                head = self._pending[0]
                cap = self._cap(head.job)
                batch, images = [], 0
                for entry in self._pending:
                    if entry is head or (entry.job.batch_key == head.job.batch_key
                                         and images + entry.job.n <= cap):
                        batch.append(entry)
                        images += entry.job.n
                        if images >= cap:
                            break
                wait = head.enqueued + self.batch_window_s - time.monotonic()
                if images >= cap or wait <= 0:
                    for entry in batch:
                        self._pending.remove(entry)
                    self._running[worker] = batch
                    return [], batch
                self._cond.wait(wait)  # for batch-mates; then look again

    def _take_expired(self) -> list[_Entry]:
        """Queued jobs stopped without the engine's knowledge, or past their deadline."""
        now = time.monotonic()
        expired = [e for e in self._pending if e.job.check_deadline(now)]
        for entry in expired:
            self._pending.remove(entry)
        return expired

    def _sweep_queue(self) -> None:
        with self._cond:
            expired = self._take_expired()
        for entry in expired:
            self._stopped(entry, entry.job.stop_error(), QUEUED)

    def _on_step(self, jobs: Sequence[GenerationJob], step: int) -> None:
        # Runs inside the pipeline call, between steps: also time out queued jobs, so a
        # long batch doesn't hold their deadlines back.
        self._sweep_queue()
        if self._step_hook is not None:
            self._step_hook(jobs, step)

    def _stopped(self, entry: _Entry, error: Exception, stage: str) -> None:
        if self._observer is not None:
            self._observer.job_stopped(entry.job.model, entry.job.stop_reason or CANCELLED,
                                       stage)
        _resolve(entry.future, error=error)

    def _run(self, batch: list[_Entry], worker: int) -> None:
        now = time.monotonic()
        live = []
        for entry in batch:
            if entry.job.check_deadline(now):
                self._stopped(entry, entry.job.stop_error(), QUEUED)
            elif entry.future.set_running_or_notify_cancel():
                live.append(entry)
        if not live:
            return
        name = live[0].job.model
        try:
            model = self._registry.get(name)
        except Exception as error:  # e.g. not ready: every job of this model fails alike
            for entry in live:
                _resolve(entry.future, error=error)
            return
        for entry in live:
            if self._observer is not None:
                self._observer.job_started(name, now - entry.enqueued)
            if entry.job.listener is not None:
                entry.job.listener.started()
        self._run_members(model, live, worker)

    def _run_members(self, model: LoadedModel, members: list[_Entry], worker: int) -> None:
        jobs = [entry.job for entry in members]
        if self._observer is not None:
            self._observer.batch_started(model.name, sum(job.n for job in jobs))
        start = time.monotonic()
        try:
            outcomes = run_batch(model, jobs, self._on_step, worker=worker)
        except Exception as error:
            if len(members) == 1:
                _resolve(members[0].future, error=error)
                return
            logger.warning("engine: a batch of %d jobs on model %s failed (%s: %s); running "
                           "each alone", len(members), model.name, type(error).__name__, error)
            for entry in members:
                if entry.job.check_deadline():
                    self._stopped(entry, entry.job.stop_error(), RUNNING)
                else:
                    self._run_members(model, [entry], worker)
            return
        finally:
            with self._cond:
                self._batch_seconds = (0.8 * self._batch_seconds
                                       + 0.2 * (time.monotonic() - start))
        for entry, outcome in zip(members, outcomes, strict=True):
            if isinstance(outcome, Exception):
                self._stopped(entry, outcome, RUNNING)
            else:
                _resolve(entry.future, result=outcome)
