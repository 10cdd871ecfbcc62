"""The step scheduler: continuous batching of denoise loops, one step at a time.

It runs wherever the denoiser runs: in the service's process in embedded mode, inside each
`Denoiser` replica in Ray mode (for every router's requests). A `DenoiseTask` is one request's
denoise block (the family's `denoise`, or whatever block holds its loop) with the request's
own state and components. Each tick a worker thread

1. runs queued work items (`call_soon`: the engine's text encoding and decoding, in embedded
   mode, so that one set of threads does all the computing and never oversubscribes the cores);
2. admits waiting tasks into their pool: runs the blocks before the loop (timesteps, noise) and
   starts the loop (`blocks.stepping.BlockRun`);
3. advances up to `cap` images' worth of a pool's running loops by one step together
   (`blocks.stepping.step_together`: one shared model forward), then tells each task
   (`TaskListener.step`) and finishes the loops that are done (the blocks after the loop run).

A pool is what may share a forward: one model at one size (the submitter names it). Tasks join a
running pool at the next step as long as it holds fewer than `cap` x workers images; a lone
task starts at once (no batching window); the pool whose runs waited longest steps next, so
pools (and, beyond the cap, the runs of one pool) take turns.

`policy="request"` keeps request-level batching for comparison: a pool admits a *batch* of
tasks with equal `lockstep` keys (up to `cap` images, waiting up to `batch_window_s` after the
first for more while below it) only when fewer than `workers` batches are running, and a batch
steps alone until its last member finishes: nobody joins mid-loop.

Stopping: a task whose `listener.stopped()` turns true is dropped at its next step (or before it
starts) and told `failed(TaskStopped(...))`. A failing task fails alone (`step_together`
isolates it); a failing listener callback fails its own task only.

A task's LoRA adapters and step caching (`TaskOptions.adapters`, `.step_cache`) are its own: in
a shared forward they apply to its rows only, and its cache decides for it alone, splitting a
step into full and cached sub-forwards where decisions differ (`blocks.stepping`'s extras).

On the CPU every model call runs under `blocks.batch_invariance.batch_invariant()`, so a
request's pixels do not depend on what shared its steps.

Not handled here: queueing before admission, back-pressure, job events and HTTP (the service's
engine), and Ray (`deployments.heavy` streams a task's reports to its router).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from blocks.batch_invariance import batch_invariant
from blocks.block import ModularPipelineBlocks
from blocks.lora import adapters_for_call
from blocks.state import PipelineState
from blocks.step_cache import StepCache, StepCacheConfig
from blocks.stepping import ADAPTERS, STEP_CACHE, BlockRun, LoopRun, StepForward, step_together

logger = logging.getLogger(__name__)

Policy = Literal["step", "request"]
POLICIES: tuple[str, ...] = ("step", "request")


class TaskStopped(Exception):
    """The task was dropped because its listener said stop; `step` steps were done."""

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped after {step} steps")
        self.step = step


@dataclass
class StepReport:
    """What a task hears after each of its steps.

    `forwards` (the number of requests in each model forward of the step), `images` (the
    images stepped together) and `seconds` (the step's duration) are set on one report per
    step of the scheduler only (its first task's), so that counting them over all reports
    counts each forward once, across routers too.

    `cache_method`, `cache_full` and `cache_cached` are this task's own step caching in this
    step (on every report of a task that caches; None, 0, 0 when it does not): its method and
    the model passes it ran fully and those whose deep part it skipped, one per pass
    (`blocks.step_cache.StepCache`'s counters, the step's share). Plain data: in Ray mode the
    Denoiser replica streams them to the router like the rest."""

    step: int  # steps done, 1-based
    total: int
    # This request's latents to preview, when the task asked for them: the scheduler's
    # estimate of the clean latents where the loop gives one (`denoised`), else the latents.
    latents: torch.Tensor | None = None
    together: int = 1  # requests stepped together with this one (itself included)
    forwards: list[int] = field(default_factory=list)
    images: int = 0
    seconds: float | None = None
    cache_method: str | None = None
    cache_full: int = 0
    cache_cached: int = 0


class TaskListener(Protocol):
    """Told what happens to a task; called on a scheduler thread (return quickly). An
    exception raised by a callback fails that task only."""

    def step(self, report: StepReport) -> None: ...

    def finished(self, state: PipelineState) -> None:
        """The block ran to its end; `state` holds its outputs."""

    def failed(self, error: BaseException) -> None: ...

    def stopped(self) -> bool:
        """True once the task should be dropped (cancelled, past its deadline)."""


@dataclass(frozen=True)
class TaskOptions:
    """How a task is scheduled; plain data, so it travels to a Denoiser replica too."""

    pool: Hashable  # tasks in one pool may share forwards: one model, one size
    images: int = 1
    cap: int = 8  # most images per forward in its pool
    policy: Policy = "step"
    lockstep: Hashable = None  # request policy: tasks with equal keys may form one batch
    want_latents: bool = False  # put its latents in each report (for previews)
    # LoRA adapters (name, scale) for its rows only; the adapters must be loaded in the model.
    adapters: tuple[tuple[str, float], ...] = ()
    step_cache: StepCacheConfig | None = None  # its own step caching (None: off)

    def loop_extras(self, total: int) -> dict[str, Any]:
        """What a loop of this task, of `total` steps, applies to its rows in shared forwards
        (`blocks.stepping.LoopRun.extras`): its adapters, and a step cache of its own."""
        extras: dict[str, Any] = {}
        if self.adapters:
            extras[ADAPTERS] = dict(self.adapters)
        if self.step_cache is not None:
            extras[STEP_CACHE] = StepCache(self.step_cache, total)
        return extras


@dataclass(eq=False)
class DenoiseTask:
    """One request's denoise block on the scheduler (see the module docstring)."""

    block: ModularPipelineBlocks
    name: str  # the block's name in its pipeline, for error messages ("denoise")
    components: Any  # the request's view of its pipeline (its own scheduler in front)
    state: PipelineState
    listener: TaskListener
    options: TaskOptions
    device: str = "cpu"
    arrived: float = field(default_factory=time.monotonic)
    # Set by the scheduler.
    run: BlockRun | None = None
    loop: LoopRun | None = None
    steps_done: int = 0
    group: int | None = None  # request policy: the batch it belongs to
    last_stepped: float = 0.0
    cache_reported: tuple[int, int] = (0, 0)  # its loop's step cache (full, cached) reported


class StepScheduler:
    """Workers that admit, step and finish `DenoiseTask`s (module docstring)."""

    def __init__(self, workers: int, batch_window_s: float,
                 name: str = "blockserve-steps") -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.workers = workers
        self.batch_window_s = batch_window_s
        self.name = name
        self._cond = threading.Condition()
        self._work: list[tuple[Callable[[], Any], Future]] = []
        self._waiting: list[DenoiseTask] = []  # arrival order
        self._active: list[DenoiseTask] = []  # admitted, loop running
        self._claimed: set[int] = set()  # ids of tasks a worker is stepping now
        self._groups = 0
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._local = threading.local()

    # -- the interface ---------------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            self._stopping = False
            self._threads = [thread for thread in self._threads if thread.is_alive()]
            while len(self._threads) < self.workers:
                thread = threading.Thread(target=self._work_loop, args=(len(self._threads),),
                                          daemon=True, name=f"{self.name}-{len(self._threads)}")
                self._threads.append(thread)
                thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish the step in progress, fail every task and work item left, stop."""
        with self._cond:
            self._stopping = True
            tasks, self._waiting, self._active = self._waiting + self._active, [], []
            work, self._work = self._work, []
            threads, self._threads = self._threads, []
            self._cond.notify_all()
        for thread in threads:
            thread.join(timeout)
        for task in tasks:
            _tell(task, "failed", RuntimeError("the step scheduler stopped"))
        for _, future in work:
            if future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError("the step scheduler stopped"))

    def submit(self, task: DenoiseTask) -> None:
        with self._cond:
            if self._stopping:
                raise RuntimeError("the step scheduler is stopped")
            if task.options.policy not in POLICIES:
                raise ValueError(f"scheduling policy {task.options.policy!r} is not one of "
                                 f"{', '.join(POLICIES)}")
            self._waiting.append(task)
            self._cond.notify_all()

    def call_soon(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on a worker before its next step; its result or error in the future."""
        future: Future = Future()
        with self._cond:
            if self._stopping:
                raise RuntimeError("the step scheduler is stopped")
            self._work.append((fn, future))
            self._cond.notify_all()
        return future

    def current_worker(self) -> int:
        """The calling worker thread's index (0 outside the workers): work items use it to
        pick objects that one thread at a time may use (e.g. a fast tokenizer)."""
        return getattr(self._local, "index", 0)

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    @property
    def active(self) -> int:
        with self._cond:
            return len(self._active)

    # -- choosing what to do ---------------------------------------------------------------

    def _work_loop(self, index: int) -> None:
        self._local.index = index
        # Served requests get no LoRA adapters but the ones they name (their rows' own in
        # shared forwards, `TaskOptions.adapters`; a work item sets its own): a pipeline's
        # active sets apply to none.
        with adapters_for_call({}):
            self._serve()

    def _serve(self) -> None:
        while True:
            with self._cond:
                item = self._next()
                while item is None and not self._stopping:
                    self._cond.wait(self._wait_seconds())
                    item = self._next()
                if item is None:
                    return
            kind, payload = item
            try:
                if kind == "work":
                    fn, future = payload
                    if future.set_running_or_notify_cancel():
                        try:
                            future.set_result(fn())
                        except BaseException as error:  # the caller sees it
                            future.set_exception(error)
                elif kind == "admit":
                    self._admit(payload)
                else:
                    self._step(payload)
            except Exception:  # a bug here must not kill the worker
                logger.exception("step scheduler: %s failed unexpectedly", kind)
                if kind != "work":
                    for task in payload:
                        self._drop(task, RuntimeError("internal step scheduler error"))
            finally:
                if kind != "work":
                    with self._cond:
                        for task in payload:
                            self._claimed.discard(id(task))
                        self._cond.notify_all()

    def _next(self) -> tuple[str, Any] | None:
        """The next thing to do (under the lock): work, an admission or a step."""
        if self._stopping:
            return None
        if self._work:
            return "work", self._work.pop(0)
        admitted = self._admissible()
        if admitted:
            for task in admitted:
                self._waiting.remove(task)
                self._active.append(task)
                self._claimed.add(id(task))
            return "admit", admitted
        runs = self._steppable()
        if runs:
            self._claimed.update(id(task) for task in runs)
            return "step", runs
        return None

    def _wait_seconds(self) -> float | None:
        """How long an idle worker may sleep: until a request batch's window closes."""
        if any(task.options.policy == "request" for task in self._waiting):
            return max(0.001, self.batch_window_s / 2)
        return None

    def _pool_images(self, pool: Hashable) -> int:
        return sum(task.options.images for task in self._active if task.options.pool == pool)

    def _admissible(self) -> list[DenoiseTask]:
        """Waiting tasks that may start now, all of one pool (oldest first)."""
        full: set[Hashable] = set()
        for head in self._waiting:
            pool = head.options.pool
            if pool in full:
                continue
            if head.options.policy == "request":
                batch = self._request_batch(head)
                if batch:
                    return batch
                full.add(pool)
                continue
            used = self._pool_images(pool)
            if used == 0 or used + head.options.images <= head.options.cap * self.workers:
                return [head]
            full.add(pool)  # first come, first served within a pool
        return []

    def _request_batch(self, head: DenoiseTask) -> list[DenoiseTask]:
        groups = {task.group for task in self._active if task.options.pool == head.options.pool}
        if len(groups) >= self.workers:
            return []
        batch, images, first = [], 0, head.options
        for task in self._waiting:
            options = task.options
            if options.pool == first.pool and options.lockstep == first.lockstep \
                    and (not batch or images + options.images <= first.cap):
                batch.append(task)
                images += task.options.images
        if images < head.options.cap and time.monotonic() < head.arrived + self.batch_window_s:
            return []  # wait a little for batch-mates
        self._groups += 1
        for task in batch:
            task.group = self._groups
        return batch

    def _steppable(self) -> list[DenoiseTask]:
        """The runs to step next: of the pool whose runs waited longest, the longest-waiting
        ones up to its cap (request policy: one whole batch)."""
        free = [task for task in self._active
                if id(task) not in self._claimed and task.loop is not None]
        if not free:
            return []
        head = min(free, key=lambda task: task.last_stepped)
        if head.options.policy == "request":  # a batch is claimed whole, so all of it is free
            return [task for task in free if task.group == head.group]
        chosen, images = [], 0
        for task in sorted((t for t in free if t.options.pool == head.options.pool),
                           key=lambda task: task.last_stepped):
            if chosen and images + task.options.images > head.options.cap:
                break
            chosen.append(task)
            images += task.options.images
        return chosen

    # -- doing it --------------------------------------------------------------------------

    def _drop(self, task: DenoiseTask, error: BaseException) -> None:
        with self._cond:
            if task in self._active:
                self._active.remove(task)
            if task in self._waiting:
                self._waiting.remove(task)
            self._cond.notify_all()
        _tell(task, "failed", error)

    def _finish(self, task: DenoiseTask, state: PipelineState) -> None:
        with self._cond:
            if task in self._active:
                self._active.remove(task)
            self._cond.notify_all()
        _tell(task, "finished", state)

    def _admit(self, tasks: list[DenoiseTask]) -> None:
        for task in tasks:
            if _stopped(task):
                self._drop(task, TaskStopped(0))
                continue
            try:
                with torch.inference_mode(), batch_invariant(task.device):
                    task.run = BlockRun(task.block, task.name, task.components, task.state)
                    _advance(task)
            except Exception as error:  # this request's inputs: it fails alone
                self._drop(task, error)
                continue
            if task.loop is None:  # a block with no loop: done already
                self._finish(task, task.run.state)

    def _step(self, tasks: list[DenoiseTask]) -> None:
        live = []
        for task in tasks:
            if _stopped(task):
                self._drop(task, TaskStopped(task.steps_done))
            else:
                live.append(task)
        if not live:
            return
        forwards: list[int] = []
        start = time.perf_counter()
        with torch.inference_mode(), batch_invariant(live[0].device):
            errors = step_together([task.loop for task in live], same_layout=True,  # type: ignore[misc]
                                   on_forward=lambda requests, rows, s: forwards.append(requests))
        seconds = time.perf_counter() - start
        forwards.extend(1 for task in live if not _shares_forward(task.loop))
        now = time.monotonic()
        reported = False
        for task, error in zip(live, errors, strict=True):
            task.last_stepped = now
            if error is not None:
                self._drop(task, error)
                continue
            task.steps_done += 1
            loop = task.loop
            assert loop is not None
            latents = _preview_latents(loop) if task.options.want_latents else None
            report = StepReport(task.steps_done, _total_steps(task), latents, len(live))
            if not reported:
                report.forwards, report.seconds, reported = forwards, seconds, True
                report.images = sum(t.options.images for t in live)
            _report_cache(task, report)
            error = _tell(task, "step", report)
            if error is not None:
                self._drop(task, error)
                continue
            if loop.done:
                try:
                    with torch.inference_mode(), batch_invariant(task.device):
                        _advance(task)
                except Exception as error:
                    self._drop(task, error)
                    continue
                if task.loop is None:
                    self._finish(task, task.run.state)  # type: ignore[union-attr]


def _advance(task: DenoiseTask) -> None:
    """Run the task's block to its next loop (started, with the task's extras) or its end."""
    assert task.run is not None
    task.loop = task.run.advance()
    if task.loop is not None:
        task.loop.extras = task.options.loop_extras(task.loop.total)
        task.cache_reported = (0, 0)  # a new loop: a new step cache


def _report_cache(task: DenoiseTask, report: StepReport) -> None:
    """Put into `report` the task's step-cache decisions since its last report."""
    cache = task.loop.extras.get(STEP_CACHE) if task.loop is not None else None
    if cache is None:
        return
    full, cached = cache.full, cache.cached
    report.cache_method = cache.config.method
    report.cache_full = full - task.cache_reported[0]
    report.cache_cached = cached - task.cache_reported[1]
    task.cache_reported = (full, cached)


def _tell(task: DenoiseTask, what: str, value: Any) -> Exception | None:
    """Call `task.listener.<what>(value)`; the error it raised, if any (its task then fails,
    nobody else)."""
    try:
        getattr(task.listener, what)(value)
    except Exception as error:
        if what != "step":
            logger.exception("step scheduler: a listener's %s() failed", what)
        return error
    return None


def _stopped(task: DenoiseTask) -> bool:
    try:
        return bool(task.listener.stopped())
    except Exception:  # a broken check: drop the task
        logger.exception("step scheduler: a stop check failed; dropping its task")
        return True


def _preview_latents(loop: LoopRun) -> torch.Tensor | None:
    # Noisy latents look like noise until late in the run; the clean estimate does not.
    denoised = loop.block_state.get("denoised")
    return denoised if denoised is not None else loop.block_state.get("latents")


def _total_steps(task: DenoiseTask) -> int:
    return task.loop.total if task.loop is not None else task.steps_done


def _shares_forward(loop: LoopRun | None) -> bool:
    return loop is not None and any(isinstance(child, StepForward)
                                    for child in loop.loop.sub_blocks.values())
